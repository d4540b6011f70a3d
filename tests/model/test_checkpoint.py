"""Checkpoint formats, locations and every error path, each naming the problem."""

import json
import os
import shutil

import numpy as np
import pytest

from model.ckpt import checkpoint
from model.ckpt import safetensors_io
from model.nn import transformer
from model.ckpt.checkpoint import CheckpointError
from model.nn.config import ConfigError
from tests.helpers import make_hf_checkpoint


def logits_of(path, tokens):
    loaded = checkpoint.load(path, progress=False)
    return np.asarray(transformer.full_logits(loaded.weights, loaded.cfg, tokens))


TOKENS = np.array([[1, 2, 3, 4, 5]])


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def rewrite_safetensors(path, edit):
    """Rewrite model.safetensors with `edit(dict name -> array)` applied."""
    file = os.path.join(path, "model.safetensors")
    st = safetensors_io.SafetensorsFile(file)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    del st
    edit(tensors)
    specs = {k: (v.shape, v.dtype) for k, v in tensors.items()}
    safetensors_io.write(file, tensors.items(), specs)


def test_sharded_safetensors_with_index(tmp_path, hf_checkpoint):
    sharded = make_hf_checkpoint(tmp_path / "sharded", hf_checkpoint.cfg, seed=0, max_shard_size="100KB")
    assert os.path.exists(os.path.join(sharded.path, "model.safetensors.index.json"))
    np.testing.assert_allclose(logits_of(sharded.path, TOKENS), hf_checkpoint.torch_logits(TOKENS), atol=1e-4)


def test_pytorch_bin_loads_with_weights_only(tmp_path, hf_checkpoint):
    import torch

    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(os.path.join(hf_checkpoint.path, "config.json"), d)
    torch.save(hf_checkpoint.torch_model.state_dict(), d / "pytorch_model.bin")
    np.testing.assert_allclose(logits_of(str(d), TOKENS), hf_checkpoint.torch_logits(TOKENS), atol=1e-4)


def test_pickled_code_in_a_bin_is_refused(tmp_path, hf_checkpoint):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(os.path.join(hf_checkpoint.path, "config.json"), d)
    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported global"):
        checkpoint.load(str(d), progress=False)


def test_fsspec_uri_is_mirrored_and_loaded(tmp_path, monkeypatch, hf_checkpoint):
    import fsspec

    monkeypatch.setenv("GPTJ_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    for name in os.listdir(hf_checkpoint.path):
        fs.pipe(f"/bucket/gptj/{name}", open(os.path.join(hf_checkpoint.path, name), "rb").read())
    np.testing.assert_allclose(logits_of("memory://bucket/gptj", TOKENS), hf_checkpoint.torch_logits(TOKENS), atol=1e-4)


def test_missing_path_is_named():
    with pytest.raises(CheckpointError, match="'/no/such/ckpt' does not exist"):
        checkpoint.load("/no/such/ckpt", progress=False)


def test_directory_without_weights(tmp_path, hf_checkpoint):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(os.path.join(hf_checkpoint.path, "config.json"), d)
    with pytest.raises(CheckpointError, match="no weights found"):
        checkpoint.load(str(d), progress=False)


def test_not_gptj_config(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "gpt2")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match="model_type='gpt2'; expected 'gptj'"):
        checkpoint.load(path, progress=False)


def test_wrong_shape_is_named(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "shape")
    rewrite_safetensors(path, lambda t: t.__setitem__("transformer.h.1.mlp.fc_in.bias", np.zeros(7, np.float32)))
    with pytest.raises(CheckpointError, match=r"transformer.h.1.mlp.fc_in.bias has shape \(7,\)"):
        checkpoint.load(path, progress=False)


def test_missing_key_is_named(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "missing")
    rewrite_safetensors(path, lambda t: t.pop("transformer.h.0.attn.v_proj.weight"))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*transformer.h.0.attn.v_proj.weight"):
        checkpoint.load(path, progress=False)


def test_leftover_key_is_named(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "leftover")
    rewrite_safetensors(path, lambda t: t.__setitem__("transformer.h.0.attn.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensor.*transformer.h.0.attn.extra.weight"):
        checkpoint.load(path, progress=False)


def test_old_attention_mask_buffers_are_not_leftovers(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "buffers")
    rewrite_safetensors(path, lambda t: t.update({"transformer.h.0.attn.bias": np.ones((1, 1, 4, 4), bool),
                                                  "transformer.h.0.attn.masked_bias": np.float32(-1e9).reshape(())}))
    np.testing.assert_allclose(logits_of(path, TOKENS), hf_checkpoint.torch_logits(TOKENS), atol=1e-4)


def test_native_checkpoint_missing_leaf(tmp_path, hf_checkpoint):
    from model import convert

    dst = str(tmp_path / "native")
    assert convert.main([hf_checkpoint.path, dst, "--dtype", "float32"]) == 0
    file = os.path.join(dst, checkpoint.NATIVE_WEIGHTS)
    st = safetensors_io.SafetensorsFile(file)
    tensors = {k: np.array(st.get(k)) for k in st.keys() if k != "layers.1.out"}
    del st
    safetensors_io.write(file, tensors.items(), {k: (v.shape, v.dtype) for k, v in tensors.items()})
    with pytest.raises(CheckpointError, match="missing 1 leaf.*layers.1.out"):
        checkpoint.load(dst, progress=False)


def test_convert_refuses_bad_source(tmp_path, capsys):
    from model import convert

    assert convert.main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_preset_like_name_is_a_clear_error():
    with pytest.raises(CheckpointError, match="does not exist.*not a preset"):
        checkpoint.load("gptj-7b", progress=False)


def test_native_to_hf_inverts_the_conversion(hf_checkpoint):
    loaded = checkpoint.load(hf_checkpoint.path, progress=False)
    named = {k: np.asarray(v) for k, v in checkpoint.leaf_names(loaded.weights).items()}
    back = checkpoint.native_to_hf(loaded.cfg, named)
    original = {k: v.detach().numpy() for k, v in hf_checkpoint.torch_model.state_dict().items()}
    assert set(back) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
