"""model/nn/kv_cache.py: the cache's specs, per-row writes at their own offsets, and the int8 cache."""

import jax.numpy as jnp
import numpy as np

from model.nn import quant
from model.nn.config import GPTJConfig
from model.nn.kv_cache import KVCache, write_kv, write_rows

CFG = GPTJConfig(vocab_size=64, n_positions=32, d_model=16, n_layers=2, n_heads=2, rotary_dim=4, d_ff=32)


def test_zeros_have_the_declared_layout():
    cache = KVCache.zeros(CFG, batch=3, length=10, dtype=jnp.bfloat16)
    assert cache.batch == 3 and cache.length == 10 and len(cache.k) == len(cache.v) == CFG.n_layers
    assert cache.k[0].shape == (3, CFG.n_heads, 10, CFG.head_dim) and cache.k[0].dtype == jnp.bfloat16
    assert cache.valid.dtype == jnp.bool_ and not cache.valid.any()
    q = KVCache.zeros(CFG, batch=3, length=10, dtype=jnp.bfloat16, quantized=True)
    assert q.v[1].values.dtype == jnp.int8 and q.v[1].values.shape == (3, CFG.n_heads, 10, CFG.head_dim)
    assert q.v[1].scale.dtype == jnp.float32 and q.v[1].scale.shape == (3, CFG.n_heads, 10)


def test_bytes_per_token():
    per_head = CFG.n_layers * CFG.n_heads * 2  # k and v
    assert KVCache.bytes_per_token(CFG, jnp.bfloat16) == per_head * CFG.head_dim * 2
    assert KVCache.bytes_per_token(CFG, jnp.bfloat16, quantized=True) == per_head * (CFG.head_dim + 4)


def test_write_rows_puts_each_row_at_its_own_offset():
    cache = jnp.zeros((3, 8), jnp.int32)  # [B, S], like `valid`
    new = jnp.array([[1, 2], [3, 4], [5, 6]])  # [B, T=2]
    out = np.asarray(write_rows(cache, new, jnp.array([0, 3, 6])))
    expected = np.zeros((3, 8), np.int32)
    expected[0, 0:2], expected[1, 3:5], expected[2, 6:8] = [1, 2], [3, 4], [5, 6]
    np.testing.assert_array_equal(out, expected)


def test_write_kv_writes_along_the_sequence_axis():
    rng = np.random.default_rng(0)
    cache = jnp.zeros((2, 2, 6, 4), jnp.float32)  # [B, N, S, H]
    new = jnp.asarray(rng.normal(size=(2, 2, 3, 4)), jnp.float32)  # [B, N, T, H]
    out = np.asarray(write_kv(cache, new, jnp.array([1, 2])))
    np.testing.assert_array_equal(out[0, :, 1:4], np.asarray(new[0]))
    np.testing.assert_array_equal(out[1, :, 2:5], np.asarray(new[1]))
    assert not out[0, :, [0, 4, 5]].any() and not out[1, :, [0, 1, 5]].any()


def test_int8_write_round_trips_within_half_a_step_per_token_and_head():
    rng = np.random.default_rng(1)
    cache = KVCache.zeros(CFG, batch=2, length=6, dtype=jnp.float32, quantized=True).k[0]
    new = rng.normal(size=(2, CFG.n_heads, 3, CFG.head_dim)).astype(np.float32) * np.array([1.0, 100.0])[None, :, None, None]
    out = write_kv(cache, jnp.asarray(new), jnp.array([0, 3]))
    assert isinstance(out, quant.QuantArray)
    for row, start in ((0, 0), (1, 3)):
        values = np.asarray(out.values[row, :, start : start + 3], np.float32)  # [N, T, H]
        scale = np.asarray(out.scale[row, :, start : start + 3])  # [N, T]: one per token and head
        np.testing.assert_allclose(scale, np.abs(new[row]).max(-1) / 127, rtol=1e-6)
        assert np.all(np.abs(values * scale[..., None] - new[row]) <= scale[..., None] / 2 * (1 + 1e-5))
    assert not np.asarray(out.values[0, :, 3:]).any() and not np.asarray(out.scale[1, :, :3]).any()
