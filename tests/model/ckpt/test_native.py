"""model/ckpt/native.py: leaf names, the manifest, and a native checkpoint checked leaf by leaf."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from model import ckpt, convert
from model.ckpt import native, safetensors_io
from model.nn import transformer
from model.nn.config import preset


@pytest.fixture(scope="module")
def native_dir(hf_checkpoint, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("native") / "f32")
    assert convert.main([hf_checkpoint.path, dst, "--dtype", "float32"]) == 0
    return dst


def test_leaf_names_are_the_pytree_paths_and_invert():
    specs = transformer.Weights.param_specs(preset("tiny"), jnp.float32, quantize=True)
    named = native.leaf_names(specs)
    assert list(named)[:3] == ["wte", "layers.0.ln_scale", "layers.0.ln_bias"]
    assert "layers.1.qkv.values" in named and "layers.1.qkv.scale" in named and "lm_head" in named
    assert native.unflatten_like(specs, named) == specs


def test_manifest_records_config_and_quantization(native_dir, hf_checkpoint):
    manifest = json.load(open(os.path.join(native_dir, ckpt.NATIVE_MANIFEST)))
    assert manifest["format"] == native.NATIVE_FORMAT and manifest["quantization"] is None
    opened = native.open_native(native_dir)
    assert opened.cfg == hf_checkpoint.cfg and opened.matrix_dtype == np.float32


def edit_manifest(src, dst, edit):
    os.makedirs(dst)
    os.symlink(os.path.join(src, ckpt.NATIVE_WEIGHTS), os.path.join(dst, ckpt.NATIVE_WEIGHTS))
    manifest = json.load(open(os.path.join(src, ckpt.NATIVE_MANIFEST)))
    edit(manifest)
    json.dump(manifest, open(os.path.join(dst, ckpt.NATIVE_MANIFEST), "w"))
    return str(dst)


def test_unknown_format_is_refused(native_dir, tmp_path):
    path = edit_manifest(native_dir, tmp_path / "v2", lambda m: m.update(format="gptj-serve-native/2"))
    with pytest.raises(ckpt.CheckpointError, match="format 'gptj-serve-native/2', expected 'gptj-serve-native/1'"):
        ckpt.load(path, progress=False)


def test_bad_config_is_named(native_dir, tmp_path):
    path = edit_manifest(native_dir, tmp_path / "badcfg", lambda m: m["config"].update(n_heads=5))
    with pytest.raises(ckpt.CheckpointError, match=f"bad config in {ckpt.NATIVE_MANIFEST}: d_model=64"):
        ckpt.load(path, progress=False)


def rewrite_weights(src, dst, edit):
    os.makedirs(dst)
    os.symlink(os.path.join(src, ckpt.NATIVE_MANIFEST), os.path.join(dst, ckpt.NATIVE_MANIFEST))
    st = safetensors_io.SafetensorsFile(os.path.join(src, ckpt.NATIVE_WEIGHTS))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    edit(tensors)
    safetensors_io.write(os.path.join(dst, ckpt.NATIVE_WEIGHTS), tensors.items(),
                         {k: (v.shape, v.dtype) for k, v in tensors.items()})
    return str(dst)


def test_native_checkpoint_missing_leaf(native_dir, tmp_path):
    path = rewrite_weights(native_dir, tmp_path / "missing", lambda t: t.pop("layers.1.out"))
    with pytest.raises(ckpt.CheckpointError, match="missing 1 leaf.*layers.1.out"):
        ckpt.load(path, progress=False)


def test_native_checkpoint_leftover_leaf(native_dir, tmp_path):
    path = rewrite_weights(native_dir, tmp_path / "leftover", lambda t: t.__setitem__("extra", np.zeros(2, np.float32)))
    with pytest.raises(ckpt.CheckpointError, match="1 unexpected leaf.*extra"):
        ckpt.load(path, progress=False)


def test_native_checkpoint_wrong_shape(native_dir, tmp_path):
    path = rewrite_weights(native_dir, tmp_path / "shape",
                           lambda t: t.__setitem__("layers.0.fc_in_bias", np.zeros(5, np.float32)))
    with pytest.raises(ckpt.CheckpointError, match=r"leaf layers.0.fc_in_bias has shape \(5,\), expected \(192,\)"):
        ckpt.load(path, progress=False)
