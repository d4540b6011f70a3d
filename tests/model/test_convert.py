"""model/convert.py: HF -> native conversion, restored straight into a 4-device mesh with 1/4 of each
sharded weight per device; bfloat16 and int8 storage; refusals."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import ckpt, convert
from model.ckpt import safetensors_io
from model.nn import sharding


def test_convert_round_trip_restores_into_4_device_mesh(hf_checkpoint, tmp_path):
    dst = str(tmp_path / "native")
    assert convert.main([hf_checkpoint.path, dst, "--dtype", "float32"]) == 0
    assert sorted(os.listdir(dst)) == [ckpt.NATIVE_MANIFEST, ckpt.NATIVE_WEIGHTS]

    hf = ckpt.load(hf_checkpoint.path, progress=False)
    mesh = sharding.make_mesh(4)
    native = ckpt.load(dst, mesh=mesh, progress=False)
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
    loaded = ckpt.load(dst16, progress=False)
    assert loaded.weights.layers[0].fc_in.dtype == jnp.bfloat16
    size = lambda d: os.path.getsize(os.path.join(d, ckpt.NATIVE_WEIGHTS))  # noqa: E731
    assert size(dst16) < 0.55 * size(dst32)


@pytest.fixture(scope="module")
def int8_at_load(hf_checkpoint):
    return ckpt.load(hf_checkpoint.path, quantize="int8", progress=False)


def test_convert_int8_stores_int8_and_loads_the_same_weights(hf_checkpoint, tmp_path, int8_at_load):
    dst = str(tmp_path / "int8")
    assert convert.main([hf_checkpoint.path, dst, "--dtype", "float32", "--quantize", "int8"]) == 0
    f32_dir = str(tmp_path / "f32")
    assert convert.main([hf_checkpoint.path, f32_dir, "--dtype", "float32"]) == 0
    stored = safetensors_io.SafetensorsFile(os.path.join(dst, ckpt.NATIVE_WEIGHTS))
    assert stored.dtype("layers.0.qkv.values") == np.int8 and stored.dtype("wte") == np.float32
    cfg = hf_checkpoint.cfg
    matrix_params = cfg.n_layers * (4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.d_ff)
    size = lambda d: os.path.getsize(os.path.join(d, ckpt.NATIVE_WEIGHTS))  # noqa: E731
    assert size(f32_dir) - size(dst) > 0.7 * 3 * matrix_params  # 3 of every 4 matrix bytes saved, less scales

    native = ckpt.load(dst, mesh=sharding.make_mesh(4), progress=False)
    assert native.quantization == "int8"
    for a, b in zip(jax.tree.leaves(native.weights), jax.tree.leaves(int8_at_load.weights)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a float native checkpoint quantized at load gives the same int8 weights too
    late = ckpt.load(f32_dir, quantize="int8", progress=False)
    for a, b in zip(jax.tree.leaves(late.weights), jax.tree.leaves(int8_at_load.weights)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_refuses_bad_source(tmp_path, capsys):
    assert convert.main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_convert_refuses_a_native_source_and_an_existing_destination(hf_checkpoint, tmp_path, capsys):
    dst = str(tmp_path / "native")
    assert convert.main([hf_checkpoint.path, dst, "--dtype", "float32"]) == 0
    assert convert.main([dst, str(tmp_path / "again")]) == 2
    assert "is already a native checkpoint" in capsys.readouterr().err
    assert convert.main([hf_checkpoint.path, dst]) == 2
    assert "already holds a native checkpoint; remove it first" in capsys.readouterr().err
