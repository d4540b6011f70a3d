"""Logical axes, the one rules table that maps them to mesh axes, and mesh construction.

Every weight and cache leaf names its axes once, with the logical names below (see
`transformer.Weights.param_specs` and `kv_cache.KVCache.param_specs`). `LOGICAL_RULES` is the only
place that decides how they land on devices, so changing the parallelism never touches model code.

The mesh has a single axis, `tp` (tensor parallel). A TPU v5e 2x2 host is a 4-device mesh: heads
and d_ff are split 4 ways, so each chip holds a quarter of every attention and MLP matrix. On CPU
the same code runs on virtual devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`).

`ParamSpec` also names each leaf's initializer (`NORMAL`, `NEAR_ONE`, `ZEROS`), so the random
preset weights, empty caches and checkpoint shape checks all read the one declaration; `is_spec`,
`map_specs`, `zeros` and `quantized` are the helpers every pytree of specs goes through.

Importable without JAX: model.ckpt reads ParamSpecs on the CPU ingress, so the functions that
build meshes, shardings or arrays import JAX when called.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# Logical axis names (the legend for every `axes=` tuple in the model).
BATCH = "batch"
SEQ = "seq"  # query / prompt positions
CACHE_SEQ = "cache_seq"  # KV cache positions
PAGES = "pages"  # the paged KV pool's page axis (page ids are global: every chip holds every page)
PAGE_SLOT = "page_slot"  # positions within one page
EMBED = "embed"  # d_model
HEADS = "heads"
HEAD_DIM = "head_dim"
QKV = "qkv"  # the stacked q / k / v axis of the fused projection
FF = "ff"  # d_ff
VOCAB = "vocab"
CANDIDATES = "candidates"  # a row's most likely next tokens (beam search, top logprobs)
ENTRIES = "entries"  # a row's list of settings or results (logit-bias entries, top tokens of a prompt position)

TP = "tp"  # the mesh axis

# Logical axis -> mesh axis (None = replicated). Tensor parallel over heads, d_ff and vocab.
LOGICAL_RULES: Mapping[str, str | None] = {
    BATCH: None,
    SEQ: None,
    CACHE_SEQ: None,
    PAGES: None,
    PAGE_SLOT: None,
    EMBED: None,
    HEADS: TP,
    HEAD_DIM: None,
    QKV: None,
    FF: TP,
    VOCAB: TP,
    CANDIDATES: None,
    ENTRIES: None,
}


class ShardingError(ValueError):
    """A logical axis has no rule, two axes of one array land on one mesh axis, or a shape does not divide."""


# Initializers a ParamSpec may name (drawn by `initialize`, for the random preset weights):
NORMAL = "normal"  # N(0, 0.02^2): embeddings, matrices and biases. Biases get this small noise
#                    rather than exact zeros so that a preset still exercises every bias path
#                    (bench.engine --compare-hf runs the same weights through transformers).
NEAR_ONE = "near_one"  # 1 + N(0, 0.02^2): LayerNorm scales
ZEROS = "zeros"  # KV caches and decode state (the default: they are buffers, not weights)
INIT_STD = 0.02
INITIALIZERS = (NORMAL, NEAR_ONE, ZEROS)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, dtype, logical axes and initializer of one array leaf: the single declaration used
    for init, checkpoint shape checks and sharding."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...]
    init: str = ZEROS

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ShardingError(f"shape {self.shape} has {len(self.shape)} dims but axes {self.axes}")
        if self.init not in INITIALIZERS:
            raise ShardingError(f"unknown initializer {self.init!r}; known: {INITIALIZERS}")


def is_spec(x: Any) -> bool:
    """The `is_leaf` for pytrees of ParamSpecs: tree maps over specs stop at each ParamSpec."""
    return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs: Any) -> Any:
    """`fn` applied to every ParamSpec of a pytree (Weights, KVCache, decode state), same structure."""
    import jax

    return jax.tree.map(fn, specs, is_leaf=is_spec)


def zeros(specs: Any) -> Any:
    """Zero arrays shaped like a pytree of ParamSpecs (an empty KV cache or decode state)."""
    import jax.numpy as jnp

    return map_specs(lambda s: jnp.zeros(s.shape, s.dtype), specs)


def initialize(spec: ParamSpec, key: Any) -> Any:
    """A random array for one leaf, drawn as `spec.init` says (in float32, cast to `spec.dtype`)."""
    import jax
    import jax.numpy as jnp

    if spec.init == ZEROS:
        return jnp.zeros(spec.shape, spec.dtype)
    noise = INIT_STD * jax.random.normal(key, spec.shape, jnp.float32)
    return (1.0 + noise if spec.init == NEAR_ONE else noise).astype(spec.dtype)


def quantized(spec: ParamSpec, *, axis: int | tuple[int, ...]):
    """The specs of a float leaf stored as int8 (a `quant.QuantArray` of ParamSpecs), matching
    `quant.quantize(x, axis=axis)`: int8 values of the full shape and axes, and float32 scales
    without the reduced `axis` (a weight's contracted leading axes, or the KV cache's head_dim),
    keeping the other dims' logical axes so that the scales shard with their values. An int8 leaf
    is never drawn at random (it is the quantization of a drawn float leaf), so both keep the
    default init."""
    from model.nn.quant import QuantArray  # quant imports jax; this module must not at import time

    axes = (axis,) if isinstance(axis, int) else axis
    reduced = {a % len(spec.shape) for a in axes}  # -1: the last axis
    kept = [i for i in range(len(spec.shape)) if i not in reduced]
    return QuantArray(
        values=ParamSpec(spec.shape, np.int8, spec.axes),
        scale=ParamSpec(tuple(spec.shape[i] for i in kept), np.float32, tuple(spec.axes[i] for i in kept)),
    )


def logical_to_mesh(axes: Sequence[str], rules: Mapping[str, str | None] = LOGICAL_RULES):
    """PartitionSpec for one leaf; fails loudly on an unmapped axis or a mesh-axis collision."""
    from jax.sharding import PartitionSpec

    mesh_axes = []
    for axis in axes:
        if axis not in rules:
            raise ShardingError(f"logical axis {axis!r} has no sharding rule; known axes: {sorted(rules)}")
        mesh_axes.append(rules[axis])
    used = [m for m in mesh_axes if m is not None]
    if len(used) != len(set(used)):
        raise ShardingError(f"logical axes {tuple(axes)} map more than one axis onto a mesh axis: {mesh_axes}")
    return PartitionSpec(*mesh_axes)


def make_mesh(n_devices: int = 1):
    """A 1-D `tp` mesh over the first `n_devices` devices (1, 2 or 4 on one TPU v5e host)."""
    import jax
    from jax.sharding import Mesh

    devices = jax.devices()
    if n_devices < 1 or n_devices > len(devices):
        raise ShardingError(
            f"mesh of {n_devices} devices requested but {len(devices)} are available ({jax.default_backend()}); "
            "on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
        )
    return Mesh(np.array(devices[:n_devices]), (TP,))


def named_sharding(mesh, spec: ParamSpec, rules: Mapping[str, str | None] = LOGICAL_RULES):
    """The NamedSharding of one leaf on `mesh`, checking that every sharded dim divides evenly."""
    from jax.sharding import NamedSharding

    pspec = logical_to_mesh(spec.axes, rules)
    for dim, (size, mesh_axis) in enumerate(zip(spec.shape, pspec)):
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            raise ShardingError(
                f"dim {dim} ({spec.axes[dim]}={size}) of shape {spec.shape} does not divide over "
                f"{mesh.shape[mesh_axis]} devices on mesh axis {mesh_axis!r}"
            )
    return NamedSharding(mesh, pspec)


def shardings(mesh, specs: Any, rules: Mapping[str, str | None] = LOGICAL_RULES) -> Any:
    """Map a pytree of ParamSpec to the matching pytree of NamedSharding."""
    return map_specs(lambda s: named_sharding(mesh, s, rules), specs)


def ensure_host_devices(n_devices: int) -> None:
    """Ask XLA for `n_devices` virtual CPU devices. Must run before jax is first imported; a no-op
    when a larger count is already requested. On an accelerator host the flag only affects CPU."""
    flag = "--xla_force_host_platform_device_count"
    flags = os.environ.get("XLA_FLAGS", "")
    for part in flags.split():
        if part.startswith(flag + "=") and int(part.split("=", 1)[1]) >= n_devices:
            return
    kept = " ".join(p for p in flags.split() if not p.startswith(flag + "="))
    os.environ["XLA_FLAGS"] = f"{kept} {flag}={n_devices}".strip()
