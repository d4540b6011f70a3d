"""model/nn/layers.py, each function against an independent reference: GPT-J's rotary embedding and
GELU as transformers implements them, attention against a plain numpy softmax, LayerNorm against
torch's."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.gptj import modeling_gptj

from model.nn import layers, quant


def test_rotate_every_two_matches_transformers():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 8)).astype(np.float32)
    expected = modeling_gptj.rotate_every_two(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(np.asarray(layers.rotate_every_two(jnp.asarray(x))), expected)


@pytest.mark.parametrize("rotary_dim, head_dim", [(8, 16), (4, 4), (16, 32)])
def test_apply_rotary_matches_transformers(rotary_dim, head_dim):
    """transformers' GPTJAttention: sin/cos gathered from create_sinusoidal_positions at each
    token's position, apply_rotary_pos_emb on the first rotary_dim dims, the rest passed through."""
    rng = np.random.default_rng(1)
    b, t, n = 2, 5, 3
    x = rng.normal(size=(b, t, n, head_dim)).astype(np.float32)
    positions = rng.integers(0, 100, size=(b, t))
    sincos = modeling_gptj.create_sinusoidal_positions(128, rotary_dim)[torch.from_numpy(positions)]  # [B, T, R]
    sin, cos = torch.split(sincos, rotary_dim // 2, dim=-1)
    x_t = torch.from_numpy(x)
    rotated = modeling_gptj.apply_rotary_pos_emb(x_t[..., :rotary_dim], sin, cos)
    expected = torch.cat([rotated, x_t[..., rotary_dim:]], dim=-1).numpy()

    ours = layers.apply_rotary(jnp.asarray(x), *layers.rotary_sin_cos(jnp.asarray(positions), rotary_dim), rotary_dim)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ours)[..., rotary_dim:], x[..., rotary_dim:])


def test_gelu_new_matches_transformers():
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    expected = ACT2FN["gelu_new"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(layers.gelu_new(jnp.asarray(x))), expected, atol=1e-6)


def test_layer_norm_matches_torch():
    rng = np.random.default_rng(2)
    x, scale, bias = rng.normal(size=(2, 3, 16)), rng.normal(size=16), rng.normal(size=16)
    x, scale, bias = (a.astype(np.float32) for a in (x, scale, bias))
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (16,), torch.from_numpy(scale),
                                              torch.from_numpy(bias), eps=1e-5).numpy()
    ours = layers.layer_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), 1e-5)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5)


def numpy_attention(q, k, v, allowed):
    """q [B, T, N, H], k / v [B, N, S, H], allowed [B, T, S]: softmax(q.k / sqrt(H)) v over allowed keys."""
    scores = np.einsum("btnh,bnsh->bnts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bnts,bnsh->btnh", probs, v)


def random_attention_inputs(seed=3, b=2, t=3, n=2, s=6, h=8):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=shape).astype(np.float32) for shape in ((b, t, n, h), (b, n, s, h), (b, n, s, h)))
    allowed = rng.random((b, t, s)) < 0.6
    allowed[..., 0] = True  # every query sees at least one key
    return q, k, v, allowed


def test_attention_matches_numpy_softmax():
    q, k, v, allowed = random_attention_inputs()
    ours = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed))
    np.testing.assert_allclose(np.asarray(ours), numpy_attention(q, k, v, allowed), atol=1e-5)


def test_attention_query_with_nothing_allowed_stays_finite():
    q, k, v, allowed = random_attention_inputs()
    allowed[0, 1] = False  # a padding query
    out = np.asarray(layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed)))
    assert np.isfinite(out).all()
    filled = allowed.copy()
    filled[0, 1] = True  # so the reference is defined there; that query is not compared
    others = np.ones(allowed.shape[:2], bool)
    others[0, 1] = False
    np.testing.assert_allclose(out[others], numpy_attention(q, k, v, filled)[others], atol=1e-5)


def test_int8_attention_equals_attention_over_the_dequantized_cache():
    """The per-token scales factored out of both contractions give the same result as scaling k, v."""
    q, k, v, allowed = random_attention_inputs(seed=4)
    kq, vq = quant.quantize(jnp.asarray(k), axis=-1), quant.quantize(jnp.asarray(v), axis=-1)
    k_deq = np.asarray(kq.values, np.float32) * np.asarray(kq.scale)[..., None]
    v_deq = np.asarray(vq.values, np.float32) * np.asarray(vq.scale)[..., None]
    ours = layers.attention(jnp.asarray(q), kq, vq, jnp.asarray(allowed))
    np.testing.assert_allclose(np.asarray(ours), numpy_attention(q, k_deq, v_deq, allowed), atol=1e-5)


def test_mlp_is_fc_out_of_gelu_of_fc_in():
    rng = np.random.default_rng(5)
    x, w_in, b_in = rng.normal(size=(2, 3, 8)), rng.normal(size=(8, 12)), rng.normal(size=12)
    w_out, b_out = rng.normal(size=(12, 8)), rng.normal(size=8)
    x, w_in, b_in, w_out, b_out = (jnp.asarray(a, jnp.float32) for a in (x, w_in, b_in, w_out, b_out))
    expected = layers.gelu_new(x @ w_in + b_in) @ w_out + b_out
    np.testing.assert_allclose(np.asarray(layers.mlp(x, w_in, b_in, w_out, b_out)), np.asarray(expected), atol=1e-4)
