"""Loading a checkpoint onto devices: `load` and what it returns.

Where a checkpoint can come from:
- a preset name (`tiny`, `small`, `gptj-6b`): random weights of those shapes from a fixed seed,
  drawn on device straight into their shardings (`transformer.init_weights`);
- a Hugging Face GPT-J directory (`hf`): converted leaf by leaf on the host, then placed;
- a native directory written by `python -m model.convert` (`native`): each device reads its own
  slice of each leaf from a memory map;
- any of the above behind an fsspec URI (`gs://bucket/dir`), mirrored once into a local cache
  (`storage.resolve`).

int8 weight-only quantization happens where the float weights are: on device for a preset, on the
host, leaf by leaf, for HF and float native checkpoints; an int8 native checkpoint loads as stored.

Importable without JAX (model.ckpt is imported by the CPU ingress); `load` imports it.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Iterable, Iterator

import numpy as np

from model.ckpt import hf, native
from model.ckpt.errors import CheckpointError
from model.ckpt.native import leaf_names, unflatten_like
from model.ckpt.storage import checkpoint_format, resolve
from model.nn.config import PRESETS, GPTJConfig
from model.nn.sharding import make_mesh, named_sharding, shardings

PRESET_SEED = 0


@dataclasses.dataclass
class Loaded:
    cfg: GPTJConfig
    weights: Any  # transformer.Weights
    source: str  # "preset", "hf" or "native"
    quantization: str | None = None  # None or "int8"


def quantization_targets(cfg: GPTJConfig, quantize_lm_head: bool) -> dict[str, tuple[int, ...]]:
    """Native leaf name -> contracted leading axes, for every leaf int8 quantization covers."""
    from model.nn.transformer import LM_HEAD_CONTRACTED, QUANTIZABLE

    targets = {f"layers.{i}.{name}": axes for i in range(cfg.n_layers) for name, axes in QUANTIZABLE.items()}
    return targets | ({"lm_head": LM_HEAD_CONTRACTED} if quantize_lm_head else {})


def quantize_leaves(leaves: Iterable[tuple[str, np.ndarray]],
                    targets: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, np.ndarray]]:
    """Replace each target leaf by its int8 values and float32 scales (`name.values`, `name.scale`)."""
    from model.nn.quant import quantize

    for name, array in leaves:
        if name in targets:
            q = quantize(array, axis=targets[name], xp=np)
            yield f"{name}.values", q.values
            yield f"{name}.scale", q.scale
        else:
            yield name, array


def load(checkpoint: str, mesh=None, dtype: str | None = None, quantize: str | None = None,
         quantize_lm_head: bool = False, progress: bool = True) -> Loaded:
    """Load `checkpoint` (preset name, HF dir, native dir, or URI) onto `mesh` (default: 1 device).

    dtype: "float32" / "bfloat16" for the float matrices (default: float32 for presets and HF
    checkpoints, the stored dtype for native ones).
    quantize: None (as stored: a native int8 checkpoint stays int8) or "int8": int8 weight-only
    quantization of qkv / out / fc_in / fc_out (and lm_head with `quantize_lm_head`) at load."""
    if quantize not in (None, "int8"):
        raise CheckpointError(f"quantize must be None or 'int8', got {quantize!r}")
    if mesh is None:
        mesh = make_mesh(1)
    if checkpoint in PRESETS:
        return _load_preset(PRESETS[checkpoint], mesh, dtype, quantize, quantize_lm_head)
    local = resolve(checkpoint, progress)
    if checkpoint_format(local) == "hf":
        return _load_hf(local, mesh, dtype, quantize, quantize_lm_head, progress)
    return _load_native(native.open_native(local), mesh, dtype, quantize, quantize_lm_head, progress)


def _load_preset(cfg: GPTJConfig, mesh, dtype: str | None, quantize: str | None, quantize_lm_head: bool) -> Loaded:
    """Random weights drawn on device, quantized there (inside jit, donating the float copy)."""
    import jax
    import jax.numpy as jnp

    from model.nn.transformer import Weights, init_weights, quantize_weights

    matrix_dtype = jnp.dtype(dtype or "float32")
    specs = Weights.param_specs(cfg, matrix_dtype)
    weights = init_weights(cfg, jax.random.key(PRESET_SEED), matrix_dtype, shardings(mesh, specs))
    if quantize:
        q_specs = Weights.param_specs(cfg, matrix_dtype, True, quantize_lm_head)
        weights = jax.jit(lambda w: quantize_weights(w, quantize_lm_head),
                          out_shardings=shardings(mesh, q_specs), donate_argnums=0)(weights)
    return Loaded(cfg, weights, "preset", quantize)


def _load_hf(path: str, mesh, dtype: str | None, quantize: str | None, quantize_lm_head: bool,
             progress: bool) -> Loaded:
    """Check every tensor, convert leaf by leaf on the host (quantizing when asked), place each."""
    import jax.numpy as jnp

    from model.nn.transformer import Weights

    cfg = hf.read_hf_config(path)
    store = hf.open_hf_tensors(path)
    hf.check_hf_tensors(cfg, store, path)
    targets = quantization_targets(cfg, quantize_lm_head) if quantize else {}
    leaves = quantize_leaves(hf.iter_hf_as_native(cfg, store), targets)
    specs = Weights.param_specs(cfg, jnp.dtype(dtype or "float32"), quantize is not None, quantize_lm_head)
    return Loaded(cfg, _put_on_mesh(specs, leaves, mesh, progress), "hf", quantize)


def _load_native(ckpt: native.NativeCheckpoint, mesh, dtype: str | None, quantize: str | None,
                 quantize_lm_head: bool, progress: bool) -> Loaded:
    """As stored, straight into the shardings; or, for int8 asked of a float checkpoint, whole
    leaves quantized on the host and then placed."""
    import jax.numpy as jnp

    from model.nn.transformer import Weights

    cfg = ckpt.cfg
    matrix_dtype = jnp.dtype(dtype) if dtype else ckpt.matrix_dtype
    if quantize and ckpt.quantization is None:
        float_leaves = native.read_float32(ckpt, leaf_names(Weights.param_specs(cfg, matrix_dtype)))
        leaves = quantize_leaves(float_leaves, quantization_targets(cfg, quantize_lm_head))
        specs = Weights.param_specs(cfg, matrix_dtype, True, quantize_lm_head)
        return Loaded(cfg, _put_on_mesh(specs, leaves, mesh, progress), "native", quantize)
    specs = Weights.param_specs(cfg, matrix_dtype, ckpt.quantization is not None, ckpt.quantize_lm_head)
    weights = _gather(specs, native.restore(ckpt, leaf_names(specs), mesh), "restore", progress)
    return Loaded(cfg, weights, "native", ckpt.quantization)


def _put_on_mesh(specs: Any, host_leaves: Iterable[tuple[str, np.ndarray]], mesh, progress: bool) -> Any:
    """Host leaves (already quantized as asked) into the pytree of `specs`, each cast to its spec's
    dtype and put on `mesh` in its sharding."""
    import jax

    named_specs = leaf_names(specs)

    def placed():
        for name, array in host_leaves:
            spec = named_specs[name]
            yield name, jax.device_put(np.asarray(array).astype(spec.dtype), named_sharding(mesh, spec))

    return _gather(specs, placed(), "load", progress)


def _gather(specs: Any, leaves: Iterable[tuple[str, Any]], desc: str, progress: bool) -> Any:
    """Named device leaves into the pytree of `specs`, with a progress bar over the leaves."""
    from tqdm import tqdm

    total = len(leaf_names(specs))
    arrays = {}
    for name, array in tqdm(leaves, desc=desc, total=total, unit="tensor", disable=not progress, file=sys.stderr,
                            mininterval=1.0):
        arrays[name] = array
    return unflatten_like(specs, arrays)
