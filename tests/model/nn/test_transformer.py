"""model/nn/transformer.py: the weights' declaration, the random init of a preset, quantize_weights,
and the padding-aware positions. (The forward pass itself is checked against transformers in
test_parity.py and against itself, step by step, in test_incremental.py.)"""

import jax
import jax.numpy as jnp
import numpy as np

from model import ckpt
from model.nn import quant, sharding, transformer
from model.nn.config import preset

TINY = preset("tiny")


def test_param_specs_declare_every_leaf_with_an_initializer():
    specs = ckpt.leaf_names(transformer.Weights.param_specs(TINY, jnp.bfloat16))
    assert len(specs) == 5 + 8 * TINY.n_layers  # wte, ln_f scale and bias, lm_head and its bias
    inits = {name.split(".")[-1]: spec.init for name, spec in specs.items()}
    assert inits["ln_scale"] == inits["ln_f_scale"] == sharding.NEAR_ONE
    assert {inits[k] for k in ("ln_bias", "fc_in_bias", "fc_out_bias", "ln_f_bias", "lm_head_bias")} == {sharding.NORMAL}
    assert specs["layers.0.qkv"].shape == (64, 3, 4, 16) and specs["layers.0.qkv"].dtype == jnp.bfloat16
    assert specs["layers.0.ln_bias"].dtype == jnp.float32  # norms and biases stay float32


def test_init_weights_norm_scales_near_one_biases_near_zero_matrices_std_002():
    """Each leaf as its kind wants: a bias of width d_model is not a norm scale."""
    weights = transformer.init_weights(TINY, jax.random.key(0))
    named = {k: np.asarray(v) for k, v in ckpt.leaf_names(weights).items()}
    for name, x in named.items():
        kind = name.split(".")[-1]
        if kind in ("ln_scale", "ln_f_scale"):
            assert abs(x.mean() - 1) < 0.01 and x.std() < 0.04, name
        elif kind.endswith("bias"):
            assert abs(x.mean()) < 0.01 and x.std() < 0.04, name
        else:
            assert abs(x.mean()) < 0.005 and abs(x.std() - 0.02) < 0.002, name


def test_init_weights_is_deterministic_and_lands_in_the_shardings():
    mesh = sharding.make_mesh(4)
    specs = transformer.Weights.param_specs(TINY, jnp.float32)
    a = transformer.init_weights(TINY, jax.random.key(1), shardings=sharding.shardings(mesh, specs))
    b = transformer.init_weights(TINY, jax.random.key(1))
    assert {s.data.shape for s in a.layers[0].fc_in.addressable_shards} == {(64, 64)}  # d_ff 256 over 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_quantize_weights_gives_the_declared_int8_specs():
    weights = transformer.quantize_weights(transformer.init_weights(TINY, jax.random.key(0)), quantize_lm_head=True)
    specs = transformer.Weights.param_specs(TINY, jnp.float32, quantize=True, quantize_lm_head=True)
    got, want = ckpt.leaf_names(weights), ckpt.leaf_names(specs)
    assert set(got) == set(want)
    for name, spec in want.items():
        assert (got[name].shape, got[name].dtype) == (spec.shape, spec.dtype), name
    assert isinstance(weights.layers[0].out, quant.QuantArray) and weights.layers[0].out.scale.shape == (TINY.d_model,)


def test_positions_from_mask_count_real_tokens_only():
    valid = jnp.array([[False, False, True, True, True], [True, True, True, False, False]])
    np.testing.assert_array_equal(np.asarray(transformer.positions_from_mask(valid)),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])
