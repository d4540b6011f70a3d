"""Decode roofline: the device's measured read bandwidth against the bytes one decode step must read,
and the fraction of it an engine figure reaches.

    python -m bench.roofline --checkpoint gptj-6b --dtype bfloat16 [--quantize int8] [--engine-jsonl FILE]

Prints {"device", "read_gb_s", "weight_bytes", "roofline_ms", "roofline_tok_s_b1"} (weights only) and,
for each engine row of FILE (bench.engine output), the row with
  "roofline_fraction"     weights-only roofline_ms / ms_per_step;
  "kv_bytes_per_step"     the KV cache a step over live tokens only reads: batch x the mean context
                          of its decode steps (prompt_len + new_tokens / 2) x KV bytes per token (in
                          the row's kv_cache_dtype), what a paged, length-aware step reads;
  "roofline_kv_fraction"  (weights + those KV bytes) / bandwidth, over ms_per_step.
The bandwidth is measured as JAX sees it: a reduction over a large array (8 GiB on an accelerator).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def read_bandwidth(gib: float) -> float:
    import jax
    import jax.numpy as jnp

    n = int(gib * 2**30) // 2
    x = jnp.ones((n,), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return n * 2 / best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="gptj-6b", help="a preset (shapes only)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--quantize", choices=["int8"], default=None)
    p.add_argument("--gib", type=float, default=None, help="bandwidth probe size (default 8 GiB, 1 GiB on CPU)")
    p.add_argument("--engine-jsonl", help="bench.engine output to annotate")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from model import ckpt
    from model.nn.config import preset
    from model.nn.kv_cache import KVCache
    from model.nn.transformer import Weights

    cfg = preset(args.checkpoint)
    specs = ckpt.leaf_names(Weights.param_specs(cfg, jnp.dtype(args.dtype), args.quantize is not None))
    # a decode step reads every matrix once (the embedding table is gathered, not read whole)
    weight_bytes = sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for n, s in specs.items() if n != "wte")
    gib = args.gib or (1.0 if jax.default_backend() == "cpu" else 8.0)
    bw = read_bandwidth(gib)
    roofline_ms = 1000 * weight_bytes / bw
    print(json.dumps({"device": jax.devices()[0].device_kind, "read_gb_s": round(bw / 1e9, 1),
                      "weight_bytes": weight_bytes, "roofline_ms": round(roofline_ms, 3),
                      "roofline_tok_s_b1": round(1000 / roofline_ms, 1)}))
    if args.engine_jsonl:
        with open(args.engine_jsonl) as f:
            for line in f:
                row = json.loads(line)
                if row.get("system") != "engine":
                    continue
                per_token = KVCache.bytes_per_token(cfg, jnp.dtype(row.get("dtype", args.dtype)),
                                                    row.get("kv_cache_dtype") == "int8")
                kv_bytes = int(row["batch"] * (row["prompt_len"] + row["new_tokens"] / 2) * per_token)
                with_kv_ms = 1000 * (weight_bytes + kv_bytes) / bw
                print(json.dumps(row | {"roofline_fraction": round(roofline_ms / row["ms_per_step"], 3),
                                        "kv_bytes_per_step": kv_bytes,
                                        "roofline_kv_fraction": round(with_kv_ms / row["ms_per_step"], 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
