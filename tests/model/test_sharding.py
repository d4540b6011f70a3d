"""Sharding: rules fail loudly, 4-device results equal 1-device results, converted checkpoints
restore straight into the mesh with 1/4 of each sharded weight per device."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.ckpt import checkpoint
from model import convert
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


@pytest.mark.parametrize("n_devices", [2, 4])
def test_sharded_equals_unsharded(hf_checkpoint, n_devices):
    tokens = np.random.RandomState(0).randint(0, hf_checkpoint.cfg.vocab_size, (2, 12))
    single = checkpoint.load(hf_checkpoint.path, progress=False)
    sharded = checkpoint.load(hf_checkpoint.path, mesh=sharding.make_mesh(n_devices), progress=False)
    assert len(sharded.weights.layers[0].fc_in.sharding.device_set) == n_devices
    a = np.asarray(transformer.full_logits(single.weights, single.cfg, tokens))
    b = np.asarray(transformer.full_logits(sharded.weights, sharded.cfg, tokens))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_convert_round_trip_restores_into_4_device_mesh(hf_checkpoint, tmp_path):
    dst = str(tmp_path / "native")
    assert convert.main([hf_checkpoint.path, dst, "--dtype", "float32"]) == 0
    assert sorted(os.listdir(dst)) == [checkpoint.NATIVE_MANIFEST, checkpoint.NATIVE_WEIGHTS]

    hf = checkpoint.load(hf_checkpoint.path, progress=False)
    mesh = sharding.make_mesh(4)
    native = checkpoint.load(dst, mesh=mesh, progress=False)
    assert native.source == "native" and native.cfg == hf.cfg
    for a, b in zip(jax.tree.leaves(hf.weights), jax.tree.leaves(native.weights)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    cfg = native.cfg
    layer = native.weights.layers[0]
    quarter = {  # leaf -> (full shape, sharded dim)
        "qkv": (layer.qkv, (cfg.d_model, 3, cfg.n_heads, cfg.head_dim), 2),
        "out": (layer.out, (cfg.n_heads, cfg.head_dim, cfg.d_model), 0),
        "fc_in": (layer.fc_in, (cfg.d_model, cfg.d_ff), 1),
        "fc_out": (layer.fc_out, (cfg.d_ff, cfg.d_model), 0),
    }
    for name, (array, full_shape, dim) in quarter.items():
        assert array.shape == full_shape
        shards = array.addressable_shards
        assert len(shards) == 4, name
        for shard in shards:
            expected = list(full_shape)
            expected[dim] //= 4
            assert shard.data.shape == tuple(expected), name


def test_convert_to_bfloat16_halves_the_bytes(hf_checkpoint, tmp_path):
    dst32, dst16 = str(tmp_path / "f32"), str(tmp_path / "bf16")
    assert convert.main([hf_checkpoint.path, dst32, "--dtype", "float32"]) == 0
    assert convert.main([hf_checkpoint.path, dst16, "--dtype", "bfloat16"]) == 0
    loaded = checkpoint.load(dst16, progress=False)
    assert loaded.weights.layers[0].fc_in.dtype == jnp.bfloat16
    size = lambda d: os.path.getsize(os.path.join(d, checkpoint.NATIVE_WEIGHTS))  # noqa: E731
    assert size(dst16) < 0.55 * size(dst32)


def test_gptj_6b_bf16_bytes_per_device_on_a_2x2_mesh():
    """GPT-J 6B on the 4-chip mesh, read from the sharded parameter shapes (no weights built)."""
    from model.nn.config import preset

    cfg = preset("gptj-6b")
    specs = checkpoint.leaf_names(transformer.Weights.param_specs(cfg, jnp.bfloat16))
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
