"""The native checkpoint: every weight leaf in the JAX layout, restored straight into its sharding.

A native directory, written by `python -m model.convert`, holds `gptj_native.json` (the format
tag, the GPTJConfig and the quantization) and `weights.safetensors`, whose keys are the weights
pytree's paths (`leaf_names`: "layers.3.qkv", or "layers.3.qkv.values" and "layers.3.qkv.scale"
when int8). Each stored leaf already has the shape and layout of its JAX leaf, so `restore` reads
every device's slice straight from a memory map: no device's full copy of a weight is built on the
host.

Importable without JAX; `leaf_names`, `unflatten_like` and `restore` import it when called.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

import numpy as np

from model.ckpt import safetensors_io
from model.ckpt.errors import CheckpointError, check_names_and_shapes
from model.nn.config import ConfigError, GPTJConfig
from model.nn.sharding import ParamSpec, is_spec, named_sharding

NATIVE_MANIFEST = "gptj_native.json"
NATIVE_WEIGHTS = "weights.safetensors"
NATIVE_FORMAT = "gptj-serve-native/1"


def leaf_names(tree: Any) -> dict[str, Any]:
    """Flatten a Weights-shaped pytree (of arrays or ParamSpecs) to {"layers.3.qkv": leaf}."""
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_spec)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in flat}


def _key_name(key: Any) -> str:
    """One step of a pytree path as a native key spells it: a dataclass field ("qkv"), a tuple
    index ("3") or a dict key."""
    for attr in ("name", "idx", "key"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    raise TypeError(f"unexpected pytree path entry {key!r}")


def unflatten_like(specs: Any, named: dict[str, Any]) -> Any:
    """The inverse of `leaf_names`: {"layers.3.qkv": leaf} back into the pytree shape of `specs`."""
    import jax

    _, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    return jax.tree.unflatten(treedef, [named[n] for n in leaf_names(specs)])


def write_native(path: str, cfg: GPTJConfig, leaves: Iterator[tuple[str, np.ndarray]], specs: dict[str, ParamSpec],
                 quantization: str | None = None, quantize_lm_head: bool = False) -> None:
    """Stream `leaves` (in the order of `specs`, named as `leaf_names` names them) into a native
    checkpoint at `path`, one leaf in memory at a time."""
    os.makedirs(path, exist_ok=True)
    safetensors_io.write(
        os.path.join(path, NATIVE_WEIGHTS),
        leaves,
        {name: (s.shape, np.dtype(s.dtype)) for name, s in specs.items()},
        metadata={"format": NATIVE_FORMAT},
    )
    manifest = {"format": NATIVE_FORMAT, "config": dataclasses.asdict(cfg), "quantization": quantization,
                "quantize_lm_head": quantize_lm_head}
    with open(os.path.join(path, NATIVE_MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)


def read_native_manifest(path: str) -> dict:
    with open(os.path.join(path, NATIVE_MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") != NATIVE_FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format')!r}, expected {NATIVE_FORMAT!r}")
    return manifest


@dataclasses.dataclass(frozen=True)
class NativeCheckpoint:
    """An opened native directory: what its manifest says, and its (memory-mapped) weights."""

    path: str
    cfg: GPTJConfig
    quantization: str | None  # None or "int8": how the matrices are stored
    quantize_lm_head: bool  # with int8: lm_head is int8 too
    weights: safetensors_io.SafetensorsFile

    @property
    def matrix_dtype(self) -> np.dtype:
        """The stored dtype of the float matrices (the embedding's); float32 if there is none."""
        if "wte" not in self.weights.keys():  # a broken file: the leaf check will name what is missing
            return np.dtype(np.float32)
        return self.weights.dtype("wte")


def open_native(path: str) -> NativeCheckpoint:
    manifest = read_native_manifest(path)
    try:
        cfg = GPTJConfig(**manifest["config"])
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path}: bad config in {NATIVE_MANIFEST}: {e}") from None
    return NativeCheckpoint(path, cfg, manifest.get("quantization"), bool(manifest.get("quantize_lm_head")),
                            safetensors_io.SafetensorsFile(os.path.join(path, NATIVE_WEIGHTS)))


def check_leaves(ckpt: NativeCheckpoint, named_specs: dict[str, ParamSpec]) -> None:
    """Every leaf of `named_specs` stored with its shape, and nothing else stored."""
    stored = {name: ckpt.weights.shape(name) for name in ckpt.weights.keys()}
    check_names_and_shapes(ckpt.path, {name: spec.shape for name, spec in named_specs.items()}, stored, "leaf")


def read_float32(ckpt: NativeCheckpoint, named_specs: dict[str, ParamSpec]) -> Iterator[tuple[str, np.ndarray]]:
    """Each leaf whole, as a float32 host array (to be quantized on the host); checked first."""
    check_leaves(ckpt, named_specs)
    for name in named_specs:
        yield name, np.asarray(ckpt.weights.get(name), np.float32)


def restore(ckpt: NativeCheckpoint, named_specs: dict[str, ParamSpec], mesh) -> Iterator[tuple[str, Any]]:
    """Each leaf as a jax.Array sharded over `mesh`, every device reading only its own slice from
    the memory map; checked first. Imports JAX (it puts arrays on devices)."""
    import jax

    check_leaves(ckpt, named_specs)
    for name, spec in named_specs.items():
        source = ckpt.weights.get(name)
        yield name, jax.make_array_from_callback(
            spec.shape, named_sharding(mesh, spec),
            lambda idx, src=source, dt=spec.dtype: np.asarray(src[idx]).astype(dt),
        )
