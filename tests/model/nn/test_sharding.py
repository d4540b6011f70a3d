"""model/nn/sharding.py: rules fail loudly, 4-device results equal 1-device results, GPT-J 6B fits a
2x2 host, and the ParamSpec helpers (is_spec, map_specs, zeros, quantized, initialize)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ckpt
from model.nn import quant
from model.nn import sharding
from model.nn import transformer
from model.nn.sharding import ParamSpec, ShardingError


def test_unmapped_axis_fails_loudly():
    with pytest.raises(ShardingError, match="'nonsense' has no sharding rule"):
        sharding.logical_to_mesh(("embed", "nonsense"))


def test_colliding_axes_fail_loudly():
    with pytest.raises(ShardingError, match="more than one axis onto a mesh axis"):
        sharding.logical_to_mesh(("heads", "ff"))


def test_indivisible_dim_fails_with_its_name():
    mesh = sharding.make_mesh(4)
    with pytest.raises(ShardingError, match=r"heads=6.*does not divide over 4 devices"):
        sharding.named_sharding(mesh, ParamSpec((6, 16), jnp.float32, ("heads", "head_dim")))


def test_too_many_devices_is_a_clear_error():
    with pytest.raises(ShardingError, match="mesh of 64 devices requested but 4 are available"):
        sharding.make_mesh(64)


def test_spec_declarations_are_checked():
    with pytest.raises(ShardingError, match=r"shape \(2, 3\) has 2 dims but axes \('embed',\)"):
        ParamSpec((2, 3), jnp.float32, ("embed",))
    with pytest.raises(ShardingError, match="unknown initializer 'ones'"):
        ParamSpec((2,), jnp.float32, ("embed",), "ones")
    assert ParamSpec((2,), jnp.float32, ("embed",)).init == sharding.ZEROS


def test_map_specs_and_zeros_keep_the_tree():
    specs = {"a": ParamSpec((2, 3), jnp.bfloat16, ("embed", "ff")), "b": (ParamSpec((4,), jnp.int32, ("batch",)),)}
    assert sharding.map_specs(lambda s: s.shape, specs) == {"a": (2, 3), "b": ((4,),)}
    zeros = sharding.zeros(specs)
    assert zeros["a"].dtype == jnp.bfloat16 and zeros["b"][0].shape == (4,) and not zeros["a"].any()
    assert sharding.is_spec(specs["a"]) and not sharding.is_spec(zeros["a"])


def test_quantized_spec_drops_the_reduced_axes_from_the_scale():
    out = ParamSpec((4, 8, 64), jnp.bfloat16, ("heads", "head_dim", "embed"), sharding.NORMAL)
    q = sharding.quantized(out, axis=(0, 1))
    assert isinstance(q, quant.QuantArray)
    assert (q.values.shape, q.values.axes, np.dtype(q.values.dtype)) == (out.shape, out.axes, np.int8)
    assert (q.scale.shape, q.scale.axes, np.dtype(q.scale.dtype)) == ((64,), ("embed",), np.float32)
    kv = ParamSpec((2, 4, 16, 8), jnp.float32, ("batch", "heads", "cache_seq", "head_dim"))
    scale = sharding.quantized(kv, axis=-1).scale
    assert (scale.shape, scale.axes) == ((2, 4, 16), ("batch", "heads", "cache_seq"))


def test_quantized_specs_match_what_quantize_produces():
    spec = ParamSpec((8, 3, 4, 2), jnp.float32, ("embed", "qkv", "heads", "head_dim"), sharding.NORMAL)
    q_spec = sharding.quantized(spec, axis=(0,))
    q = quant.quantize(jnp.ones(spec.shape), axis=(0,))
    assert (q.values.shape, q.values.dtype) == (q_spec.values.shape, q_spec.values.dtype)
    assert (q.scale.shape, q.scale.dtype) == (q_spec.scale.shape, q_spec.scale.dtype)


@pytest.mark.parametrize("init, mean, std", [(sharding.NORMAL, 0.0, 0.02), (sharding.NEAR_ONE, 1.0, 0.02),
                                             (sharding.ZEROS, 0.0, 0.0)])
def test_initialize_draws_as_declared(init, mean, std):
    x = np.asarray(sharding.initialize(ParamSpec((256, 256), jnp.float32, ("embed", "ff"), init), jax.random.key(0)))
    assert abs(x.mean() - mean) < 1e-3 and abs(x.std() - std) < 1e-3


@pytest.mark.parametrize("n_devices", [2, 4])
def test_sharded_equals_unsharded(hf_checkpoint, n_devices):
    tokens = np.random.RandomState(0).randint(0, hf_checkpoint.cfg.vocab_size, (2, 12))
    single = ckpt.load(hf_checkpoint.path, progress=False)
    sharded = ckpt.load(hf_checkpoint.path, mesh=sharding.make_mesh(n_devices), progress=False)
    assert len(sharded.weights.layers[0].fc_in.sharding.device_set) == n_devices
    a = np.asarray(transformer.full_logits(single.weights, single.cfg, tokens))
    b = np.asarray(transformer.full_logits(sharded.weights, sharded.cfg, tokens))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_gptj_6b_bf16_bytes_per_device_on_a_2x2_mesh():
    """GPT-J 6B on the 4-chip mesh, read from the sharded parameter shapes (no weights built)."""
    from model.nn.config import preset

    cfg = preset("gptj-6b")
    specs = ckpt.leaf_names(transformer.Weights.param_specs(cfg, jnp.bfloat16))
    mesh = sharding.make_mesh(4)
    total = per_device = 0
    for spec in specs.values():
        nbytes = int(np.prod(spec.shape)) * jnp.dtype(spec.dtype).itemsize
        shard_shape = sharding.named_sharding(mesh, spec).shard_shape(spec.shape)
        total += nbytes
        per_device += int(np.prod(shard_shape)) * jnp.dtype(spec.dtype).itemsize
    assert cfg.num_params() == 6_050_882_784
    # every matrix is split 4 ways; only norms and the (fp32) residual biases are replicated
    assert per_device < total / 4 * 1.001
    assert 3.0e9 < per_device < 3.1e9
