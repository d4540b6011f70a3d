"""Logical axes, the one rules table that maps them to mesh axes, and mesh construction.

Every weight and cache leaf names its axes once, with the logical names below (see
`transformer.Weights.param_specs` and `kv_cache.KVCache.param_specs`). `LOGICAL_RULES` is the only
place that decides how they land on devices, so changing the parallelism never touches model code.

The mesh has a single axis, `tp` (tensor parallel). A TPU v5e 2x2 host is a 4-device mesh: heads
and d_ff are split 4 ways, so each chip holds a quarter of every attention and MLP matrix. On CPU
the same code runs on virtual devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

# Logical axis names (the legend for every `axes=` tuple in the model).
BATCH = "batch"
SEQ = "seq"  # query / prompt positions
CACHE_SEQ = "cache_seq"  # KV cache positions
EMBED = "embed"  # d_model
HEADS = "heads"
HEAD_DIM = "head_dim"
QKV = "qkv"  # the stacked q / k / v axis of the fused projection
FF = "ff"  # d_ff
VOCAB = "vocab"

TP = "tp"  # the mesh axis

# Logical axis -> mesh axis (None = replicated). Tensor parallel over heads, d_ff and vocab.
LOGICAL_RULES: Mapping[str, str | None] = {
    BATCH: None,
    SEQ: None,
    CACHE_SEQ: None,
    EMBED: None,
    HEADS: TP,
    HEAD_DIM: None,
    QKV: None,
    FF: TP,
    VOCAB: TP,
}


class ShardingError(ValueError):
    """A logical axis has no rule, two axes of one array land on one mesh axis, or a shape does not divide."""


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, dtype and logical axes of one array leaf: the single declaration used for init,
    checkpoint shape checks and sharding."""

    shape: tuple[int, ...]
    dtype: Any
    axes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ShardingError(f"shape {self.shape} has {len(self.shape)} dims but axes {self.axes}")


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
    import jax

    return jax.tree.map(
        lambda s: named_sharding(mesh, s, rules), specs, is_leaf=lambda x: isinstance(x, ParamSpec)
    )


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
