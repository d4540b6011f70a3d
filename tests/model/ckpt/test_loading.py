"""model/ckpt/loading.py: `load` from each source, with and without int8, and the package's promise
that importing model.ckpt (as the CPU ingress does) never imports JAX."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from model import ckpt
from model.ckpt import loading
from model.nn import quant, sharding
from model.nn.config import preset


def test_model_ckpt_and_text_import_without_jax():
    code = "import sys, model.ckpt, model.text.tokenizer; assert 'jax' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_preset_like_name_is_a_clear_error():
    with pytest.raises(ckpt.CheckpointError, match="does not exist.*not a preset"):
        ckpt.load("gptj-7b", progress=False)


def test_unknown_quantization_is_refused():
    with pytest.raises(ckpt.CheckpointError, match="quantize must be None or 'int8'"):
        ckpt.load("tiny", quantize="int4", progress=False)


def test_preset_weights_come_from_a_fixed_seed_in_any_dtype_and_mesh():
    a, b = ckpt.load("tiny", progress=False), ckpt.load("tiny", dtype="bfloat16", mesh=sharding.make_mesh(4),
                                                        progress=False)
    assert a.source == "preset" and a.cfg == preset("tiny") and b.weights.wte.dtype == "bfloat16"
    np.testing.assert_allclose(np.asarray(b.weights.layers[0].fc_in, np.float32),
                               np.asarray(a.weights.layers[0].fc_in), rtol=1e-2)


def test_preset_quantized_on_device_matches_host_quantization():
    on_device = ckpt.load("tiny", quantize="int8", quantize_lm_head=True, progress=False)
    float_w = ckpt.load("tiny", progress=False)
    host = quant.quantize(np.asarray(float_w.weights.layers[1].fc_out), axis=0, xp=np)
    np.testing.assert_array_equal(np.asarray(on_device.weights.layers[1].fc_out.values), host.values)
    assert isinstance(on_device.weights.lm_head, quant.QuantArray)


def test_quantization_targets_cover_the_matrices_and_optionally_lm_head():
    cfg = preset("tiny")
    targets = loading.quantization_targets(cfg, quantize_lm_head=False)
    assert targets["layers.1.out"] == (0, 1) and targets["layers.0.qkv"] == (0,) and "lm_head" not in targets
    assert len(targets) == 4 * cfg.n_layers
    assert loading.quantization_targets(cfg, quantize_lm_head=True)["lm_head"] == (0,)


def test_quantize_leaves_splits_only_the_targets():
    leaves = [("a", np.ones((2, 3), np.float32)), ("b", np.ones(3, np.float32))]
    out = dict(loading.quantize_leaves(leaves, {"a": (0,)}))
    assert set(out) == {"a.values", "a.scale", "b"}
    assert out["a.values"].dtype == np.int8 and out["a.scale"].shape == (3,)


def test_hf_checkpoint_loads_into_the_mesh_as_float32_by_default(hf_checkpoint):
    loaded = ckpt.load(hf_checkpoint.path, mesh=sharding.make_mesh(2), progress=False)
    assert loaded.source == "hf" and loaded.quantization is None and loaded.cfg == hf_checkpoint.cfg
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(loaded.weights))
    assert len(loaded.weights.layers[0].fc_in.sharding.device_set) == 2
