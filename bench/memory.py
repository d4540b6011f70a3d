"""Memory plan: GPT-J bytes per device on a mesh, and how many full-context sequences fit.

    python -m bench.memory [--checkpoint gptj-6b] [--mesh 4] [--hbm-gib 16] [--reserve-gib 1.5] [--json]

Computed from the sharded parameter and KV-cache shapes (nothing is allocated), for three setups:
bf16 weights + bf16 KV, int8 weights + bf16 KV, int8 weights + int8 KV. "max_seqs" is the number of
concurrent sequences of n_positions tokens (2048 for GPT-J) whose KV cache fits beside the weights
on every device of the mesh, after reserving `--reserve-gib` per device for activations and XLA
workspace (a 2048-token bf16 prefill of GPT-J needs well under 1 GiB of live activations per chip).
Defaults: one TPU v5e 2x2 host (4 chips, 16 GiB HBM each).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def plan(cfg, mesh_size: int, hbm_gib: float, reserve_gib: float) -> list[dict]:
    import jax.numpy as jnp

    from model import ckpt
    from model.nn import sharding
    from model.nn.kv_cache import KVCache
    from model.nn.transformer import Weights

    mesh = sharding.make_mesh(mesh_size)
    rows = []
    for name, quantize, kv_int8 in [("bf16", False, False), ("int8 weights", True, False),
                                    ("int8 weights + int8 KV", True, True)]:
        specs = ckpt.leaf_names(Weights.param_specs(cfg, jnp.bfloat16, quantize))
        total = per_device = 0
        for spec in specs.values():
            itemsize = jnp.dtype(spec.dtype).itemsize
            total += int(np.prod(spec.shape)) * itemsize
            per_device += int(np.prod(sharding.named_sharding(mesh, spec).shard_shape(spec.shape))) * itemsize
        kv_per_token = KVCache.bytes_per_token(cfg, jnp.bfloat16, kv_int8)  # heads split over the mesh
        kv_per_seq_device = kv_per_token * cfg.n_positions // mesh_size
        free = hbm_gib * 2**30 - reserve_gib * 2**30 - per_device
        rows.append({
            "setup": name, "mesh": mesh_size, "weights_bytes": total, "weights_bytes_per_device": per_device,
            "kv_bytes_per_token": kv_per_token, "kv_bytes_per_seq_per_device": kv_per_seq_device,
            "max_seqs": max(int(free // kv_per_seq_device), 0),
        })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="gptj-6b", help="a preset name (shapes only)")
    p.add_argument("--mesh", type=int, default=4)
    p.add_argument("--hbm-gib", type=float, default=16.0, help="HBM per device")
    p.add_argument("--reserve-gib", type=float, default=1.5, help="per device, for activations and workspace")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from model.nn.sharding import ensure_host_devices

    ensure_host_devices(args.mesh)
    from model.nn.config import preset

    rows = plan(preset(args.checkpoint), args.mesh, args.hbm_gib, args.reserve_gib)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['setup']:<24} weights {r['weights_bytes'] / 1e9:6.2f} GB total, "
                  f"{r['weights_bytes_per_device'] / 1e9:5.2f} GB/device; KV {r['kv_bytes_per_token']:,} B/token; "
                  f"{r['max_seqs']} x {preset(args.checkpoint).n_positions}-token sequences per host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
