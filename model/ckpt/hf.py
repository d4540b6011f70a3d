"""Hugging Face GPT-J checkpoints: reading their tensors, and the HF <-> native mapping, declared once.

A Hugging Face GPT-J directory holds config.json plus model.safetensors, sharded safetensors with
model.safetensors.index.json, or pytorch_model.bin (read only when torch is installed, and always
with `weights_only=True`: no pickled code runs). `open_hf_tensors` gives a lazy name -> tensor
store over any of them.

The mapping (`hf_mapping`) gives every native leaf the HF tensors it is built from and a `Layout`:
GPT-J's layout quirks as named classes, each knowing both directions and the HF shapes a native
shape implies. So the conversion HF -> native (`iter_hf_as_native`), its inverse (`native_to_hf`,
which lets transformers run exactly the weights a preset or native checkpoint holds) and the shape
check (`hf_source_shapes`) all read the one table. Conversion is target-driven: a missing key, a
leftover key and a wrong shape are each caught and named before any tensor is converted.

The native leaf shapes come from `transformer.Weights.param_specs` (the model's one declaration),
which imports JAX; `native_specs` imports it when called, so this module imports without JAX.
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import json
import math
import os
from typing import Any, Callable, Iterator

import numpy as np

from model.ckpt import safetensors_io
from model.ckpt.errors import CheckpointError, check_names_and_shapes
from model.ckpt.native import leaf_names
from model.nn.config import GPTJConfig
from model.nn.sharding import ParamSpec

Shape = tuple[int, ...]

# Buffers that old GPT-J checkpoints carry (the causal-mask constants); not weights.
HF_IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")


# ---------------------------------------------------------------------------------------------
# Layouts: how a native leaf and its HF tensors relate. torch Linear stores [out, in].


class Layout(abc.ABC):
    """One native leaf <-> its HF tensors (in the order the mapping names them)."""

    @abc.abstractmethod
    def to_native(self, shape: Shape, *hf: np.ndarray) -> np.ndarray:
        """The native leaf of `shape`, from its HF tensors."""

    @abc.abstractmethod
    def to_hf(self, native: np.ndarray) -> tuple[np.ndarray, ...]:
        """The HF tensors of a native leaf: the exact inverse of `to_native`."""

    @abc.abstractmethod
    def hf_shapes(self, shape: Shape) -> tuple[Shape, ...]:
        """The shapes the HF tensors must have for a native leaf of `shape`."""


class Same(Layout):
    """The same array in both (embedding, norms, biases)."""

    def to_native(self, shape, x):
        return x

    def to_hf(self, native):
        return (native,)

    def hf_shapes(self, shape):
        return (shape,)


class Transposed(Layout):
    """A torch Linear weight [out, in] stored as [in, out] (fc_in, fc_out, lm_head)."""

    def to_native(self, shape, w):
        return w.T

    def to_hf(self, native):
        return (native.T,)

    def hf_shapes(self, shape):
        return (shape[::-1],)


class FusedQKV(Layout):
    """q_proj, k_proj, v_proj, each [N*H, D], fused into one [D, C=3, N, H] leaf."""

    def to_native(self, shape, q, k, v):
        return np.stack([q.T, k.T, v.T], axis=1).reshape(shape)  # [D, 3, N*H] -> [D, 3, N, H]

    def to_hf(self, native):
        qkv = native.reshape(native.shape[0], 3, -1)  # [D, 3, N*H]
        return qkv[:, 0].T, qkv[:, 1].T, qkv[:, 2].T

    def hf_shapes(self, shape):
        d, n_times_h = shape[0], math.prod(shape[2:])
        return ((n_times_h, d),) * 3


class OutProj(Layout):
    """out_proj [D, N*H] stored as [N, H, D]."""

    def to_native(self, shape, w):
        return w.T.reshape(shape)  # [N*H, D] -> [N, H, D]

    def to_hf(self, native):
        return (native.reshape(-1, native.shape[-1]).T,)  # [N*H, D] -> [D, N*H]

    def hf_shapes(self, shape):
        return ((shape[-1], math.prod(shape[:-1])),)


SAME, TRANSPOSED, FUSED_QKV, OUT_PROJ = Same(), Transposed(), FusedQKV(), OutProj()


@dataclasses.dataclass(frozen=True)
class HFLeaf:
    """Where one native leaf comes from: these HF tensors, related to it by `layout`."""

    sources: tuple[str, ...]
    layout: Layout


def hf_mapping(cfg: GPTJConfig) -> dict[str, HFLeaf]:
    """Every native leaf's HF tensors and layout: the one declaration of the HF <-> native mapping."""
    mapping = {"wte": HFLeaf(("transformer.wte.weight",), SAME)}
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        mapping |= {
            f"layers.{i}.ln_scale": HFLeaf((p + "ln_1.weight",), SAME),
            f"layers.{i}.ln_bias": HFLeaf((p + "ln_1.bias",), SAME),
            f"layers.{i}.qkv": HFLeaf(
                (p + "attn.q_proj.weight", p + "attn.k_proj.weight", p + "attn.v_proj.weight"), FUSED_QKV
            ),
            f"layers.{i}.out": HFLeaf((p + "attn.out_proj.weight",), OUT_PROJ),
            f"layers.{i}.fc_in": HFLeaf((p + "mlp.fc_in.weight",), TRANSPOSED),
            f"layers.{i}.fc_in_bias": HFLeaf((p + "mlp.fc_in.bias",), SAME),
            f"layers.{i}.fc_out": HFLeaf((p + "mlp.fc_out.weight",), TRANSPOSED),
            f"layers.{i}.fc_out_bias": HFLeaf((p + "mlp.fc_out.bias",), SAME),
        }
    mapping |= {
        "ln_f_scale": HFLeaf(("transformer.ln_f.weight",), SAME),
        "ln_f_bias": HFLeaf(("transformer.ln_f.bias",), SAME),
        "lm_head": HFLeaf(("lm_head.weight",), TRANSPOSED),
        "lm_head_bias": HFLeaf(("lm_head.bias",), SAME),
    }
    return mapping


def native_specs(cfg: GPTJConfig) -> dict[str, ParamSpec]:
    """The float native leaves by name, checked against `hf_mapping` (the model's declaration and
    the mapping must name the same leaves). Imports JAX (through the transformer module)."""
    from model.nn.transformer import Weights

    specs = leaf_names(Weights.param_specs(cfg, np.float32))
    mapping = hf_mapping(cfg)
    if set(mapping) != set(specs):
        raise CheckpointError(f"native leaves and HF recipes disagree: {sorted(set(mapping) ^ set(specs))[:5]}")
    return specs


def hf_source_shapes(cfg: GPTJConfig) -> dict[str, Shape]:
    """The shape every HF GPT-J tensor must have for this config."""
    mapping = hf_mapping(cfg)
    shapes = {}
    for name, spec in native_specs(cfg).items():
        leaf = mapping[name]
        shapes |= dict(zip(leaf.sources, leaf.layout.hf_shapes(spec.shape)))
    return shapes


def native_to_hf(cfg: GPTJConfig, named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of the conversion: native leaves -> a Hugging Face GPT-J state dict (so
    transformers can run exactly the weights a preset or native checkpoint holds)."""
    out = {}
    for name, leaf in hf_mapping(cfg).items():
        out |= dict(zip(leaf.sources, leaf.layout.to_hf(named[name])))
    return out


def iter_hf_as_native(cfg: GPTJConfig, store: TensorStore) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (native name, float32 array in the native layout), one unquantized leaf at a time."""
    mapping = hf_mapping(cfg)
    for name, spec in native_specs(cfg).items():
        leaf = mapping[name]
        array = leaf.layout.to_native(spec.shape, *(np.asarray(store.read(s), dtype=np.float32) for s in leaf.sources))
        if array.shape != spec.shape:
            raise CheckpointError(f"leaf {name}: built shape {array.shape}, expected {spec.shape}")
        yield name, array


# ---------------------------------------------------------------------------------------------
# Reading an HF directory.


class TensorStore:
    """Name -> lazily read numpy tensor, over one or more files of a checkpoint directory."""

    def __init__(self, readers: dict[str, Callable[[], np.ndarray]], shapes: dict[str, Shape]):
        self._readers = readers
        self.shapes = shapes

    def keys(self) -> set[str]:
        return set(self._readers)

    def read(self, name: str) -> np.ndarray:
        return self._readers[name]()


def open_hf_tensors(path: str) -> TensorStore:
    """The tensors of an HF directory: safetensors (single or indexed) first, then torch .bin."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return _open_safetensors(path, sorted(set(json.load(f)["weight_map"].values())))
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return _open_safetensors(path, ["model.safetensors"])
    bins = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if bins:
        return _open_torch_bins(path, bins)
    raise CheckpointError(
        f"{path}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _open_safetensors(path: str, files: list[str]) -> TensorStore:
    readers, shapes = {}, {}
    for name in files:
        file_path = os.path.join(path, name)
        if not os.path.exists(file_path):
            raise CheckpointError(f"{path}: shard {name} named in model.safetensors.index.json is missing")
        st = safetensors_io.SafetensorsFile(file_path)
        for key in st.keys():
            readers[key] = (lambda st=st, key=key: st.get(key))
            shapes[key] = st.shape(key)
    return TensorStore(readers, shapes)


def _open_torch_bins(path: str, bins: list[str]) -> TensorStore:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} holds only pytorch_model.bin, which needs torch to read; install torch or convert it to safetensors"
        ) from None
    state: dict[str, Any] = {}
    for b in bins:
        # weights_only=True: tensors and plain containers only, never arbitrary pickled code.
        state |= torch.load(b, map_location="cpu", weights_only=True)

    def to_numpy(t):
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    readers = {k: (lambda t=t: to_numpy(t)) for k, t in state.items()}
    return TensorStore(readers, {k: tuple(t.shape) for k, t in state.items()})


def read_hf_config(path: str) -> GPTJConfig:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise CheckpointError(f"{path}: no config.json; not a Hugging Face checkpoint directory")
    with open(config_path) as f:
        return GPTJConfig.from_hf_dict(json.load(f))


def check_hf_tensors(cfg: GPTJConfig, store: TensorStore, where: str) -> None:
    """Every expected tensor present with its shape; nothing left over but the known buffers."""
    present = {k: store.shapes[k] for k in store.keys() if not k.endswith(HF_IGNORED_SUFFIXES)}
    check_names_and_shapes(where, hf_source_shapes(cfg), present, "tensor", " not used by GPT-J")
