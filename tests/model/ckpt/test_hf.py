"""model/ckpt/hf.py: the HF <-> native mapping (one table, both directions and the shapes), reading
every HF layout, and each error path naming the problem."""

import json
import os
import shutil

import numpy as np
import pytest

from model import ckpt
from model.ckpt import hf, safetensors_io
from model.ckpt.hf import TensorStore
from model.nn import transformer
from model.nn.config import ConfigError
from tests.helpers import make_hf_checkpoint

TOKENS = np.array([[1, 2, 3, 4, 5]])


def logits_of(path, tokens):
    loaded = ckpt.load(path, progress=False)
    return np.asarray(transformer.full_logits(loaded.weights, loaded.cfg, tokens))


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


def state_dict_of(hf_checkpoint):
    return {k: v.detach().numpy() for k, v in hf_checkpoint.torch_model.state_dict().items()}


def store_of(state):
    return TensorStore({k: (lambda v=v: v) for k, v in state.items()}, {k: v.shape for k, v in state.items()})


@pytest.mark.parametrize("layout, shape, hf_shapes", [
    (hf.SAME, (7,), [(7,)]),
    (hf.TRANSPOSED, (4, 6), [(6, 4)]),
    (hf.FUSED_QKV, (8, 3, 2, 4), [(8, 8)] * 3),
    (hf.OUT_PROJ, (2, 4, 8), [(8, 8)]),
])
def test_every_layout_inverts_itself(layout, shape, hf_shapes):
    rng = np.random.default_rng(0)
    sources = [rng.normal(size=s).astype(np.float32) for s in layout.hf_shapes(shape)]
    assert [s.shape for s in sources] == hf_shapes
    native = layout.to_native(shape, *sources)
    assert native.shape == shape
    for back, original in zip(layout.to_hf(native), sources, strict=True):
        np.testing.assert_array_equal(back, original)


def test_fused_qkv_puts_q_k_v_on_the_stacked_axis():
    d, n, h = 8, 2, 4
    q, k, v = (np.full((n * h, d), i, np.float32) for i in (0, 1, 2))
    native = hf.FUSED_QKV.to_native((d, 3, n, h), q, k, v)
    assert [set(np.unique(native[:, c])) for c in range(3)] == [{0}, {1}, {2}]


def test_hf_source_shapes_are_transformers_own(hf_checkpoint):
    expected = {k: v.shape for k, v in state_dict_of(hf_checkpoint).items() if not k.endswith(hf.HF_IGNORED_SUFFIXES)}
    assert hf.hf_source_shapes(hf_checkpoint.cfg) == expected


def test_hf_to_native_to_hf_is_the_identity(hf_checkpoint):
    """The round trip through the one mapping, on the host: every tensor back bit for bit."""
    state = state_dict_of(hf_checkpoint)
    named = dict(hf.iter_hf_as_native(hf_checkpoint.cfg, store_of(state)))
    back = hf.native_to_hf(hf_checkpoint.cfg, named)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_native_to_hf_inverts_the_conversion(hf_checkpoint):
    loaded = ckpt.load(hf_checkpoint.path, progress=False)
    named = {k: np.asarray(v) for k, v in ckpt.leaf_names(loaded.weights).items()}
    back = ckpt.native_to_hf(loaded.cfg, named)
    original = state_dict_of(hf_checkpoint)
    assert set(back) == set(original)
    for k, v in original.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_sharded_safetensors_with_index(tmp_path, hf_checkpoint):
    sharded = make_hf_checkpoint(tmp_path / "sharded", hf_checkpoint.cfg, seed=0, max_shard_size="100KB")
    assert os.path.exists(os.path.join(sharded.path, "model.safetensors.index.json"))
    np.testing.assert_allclose(logits_of(sharded.path, TOKENS), hf_checkpoint.torch_logits(TOKENS), atol=1e-4)


def test_missing_shard_is_named(tmp_path, hf_checkpoint):
    sharded = make_hf_checkpoint(tmp_path / "sharded", hf_checkpoint.cfg, seed=0, max_shard_size="100KB")
    shard = sorted(f for f in os.listdir(sharded.path) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(sharded.path, shard))
    with pytest.raises(ckpt.CheckpointError, match=f"shard {shard} named in model.safetensors.index.json is missing"):
        hf.open_hf_tensors(sharded.path)


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
        ckpt.load(str(d), progress=False)


def test_directory_without_weights(tmp_path, hf_checkpoint):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(os.path.join(hf_checkpoint.path, "config.json"), d)
    with pytest.raises(ckpt.CheckpointError, match="no weights found"):
        ckpt.load(str(d), progress=False)


def test_directory_without_config(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no config.json; not a Hugging Face checkpoint directory"):
        hf.read_hf_config(str(tmp_path))


def test_not_gptj_config(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "gpt2")
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["model_type"] = "gpt2"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(ConfigError, match="model_type='gpt2'; expected 'gptj'"):
        ckpt.load(path, progress=False)


def test_wrong_shape_is_named(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "shape")
    rewrite_safetensors(path, lambda t: t.__setitem__("transformer.h.1.mlp.fc_in.bias", np.zeros(7, np.float32)))
    with pytest.raises(ckpt.CheckpointError, match=r"transformer.h.1.mlp.fc_in.bias has shape \(7,\)"):
        ckpt.load(path, progress=False)


def test_missing_key_is_named(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "missing")
    rewrite_safetensors(path, lambda t: t.pop("transformer.h.0.attn.v_proj.weight"))
    with pytest.raises(ckpt.CheckpointError, match="missing 1 tensor.*transformer.h.0.attn.v_proj.weight"):
        ckpt.load(path, progress=False)


def test_leftover_key_is_named(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "leftover")
    rewrite_safetensors(path, lambda t: t.__setitem__("transformer.h.0.attn.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(ckpt.CheckpointError, match="unexpected tensor.*transformer.h.0.attn.extra.weight"):
        ckpt.load(path, progress=False)


def test_old_attention_mask_buffers_are_not_leftovers(tmp_path, hf_checkpoint):
    path = copy_checkpoint(hf_checkpoint.path, tmp_path / "buffers")
    rewrite_safetensors(path, lambda t: t.update({"transformer.h.0.attn.bias": np.ones((1, 1, 4, 4), bool),
                                                  "transformer.h.0.attn.masked_bias": np.float32(-1e9).reshape(())}))
    np.testing.assert_allclose(logits_of(path, TOKENS), hf_checkpoint.torch_logits(TOKENS), atol=1e-4)
