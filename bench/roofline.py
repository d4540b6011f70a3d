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
The bandwidth is measured as JAX sees it: a reduction over a large array (8 GiB on an accelerator),
or taken as given (`--read-gb-s`, e.g. a spec sheet's, for a device that is not here).

With `--mlperf-requests R` it also projects MLPerf GPT-J Offline (bench.mlperf's workload: prompts of
MLPERF_PROMPT_TOKENS, MLPERF_OUTPUT_TOKENS new tokens, 4 beams) on a device of that bandwidth and
`--tflops` of dense compute, labelled "projected": R requests (4R beam rows) decode together, each
step reading the weights once and every row's KV cache over its live context (the prompt, read by
each beam, and half the output on average); each prompt's prefill is compute-bound (2 x parameters x
prompt FLOPs) and not overlapped with decoding. samples/s = 1 / (steps x step time / R + prefill time);
with `--price-per-hour`, samples per dollar. An upper bound: no kernel reaches the roofline, and
nothing here counts the host, beam bookkeeping or batching gaps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

MLPERF_PROMPT_TOKENS = 865  # the note's whole-validation-split estimate (bench.mlperf's QSL mean)
MLPERF_OUTPUT_TOKENS = 69  # LoadGen's tokens per GPT-J sample
MLPERF_BEAMS = 4


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
    p.add_argument("--read-gb-s", type=float, help="take this read bandwidth (GB/s) instead of measuring it")
    p.add_argument("--device-name", help="with --read-gb-s: what the figures are for (default: this device)")
    p.add_argument("--mlperf-requests", type=int, help="project MLPerf GPT-J Offline with this many requests "
                   "(x 4 beams) decoding together")
    p.add_argument("--tflops", type=float, help="with --mlperf-requests: dense TFLOP/s for the prefill")
    p.add_argument("--price-per-hour", type=float, help="with --mlperf-requests: USD per hour of the device")
    args = p.parse_args(argv)
    if args.mlperf_requests is not None and args.tflops is None:
        p.error("--mlperf-requests needs --tflops (the prefill is compute-bound)")

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
    if args.read_gb_s:
        bw, device = args.read_gb_s * 1e9, args.device_name or jax.devices()[0].device_kind
    else:
        bw, device = read_bandwidth(args.gib or (1.0 if jax.default_backend() == "cpu" else 8.0)), jax.devices()[0].device_kind
    roofline_ms = 1000 * weight_bytes / bw
    print(json.dumps({"device": device, "read_gb_s": round(bw / 1e9, 1),
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
    if args.mlperf_requests is not None:
        kv_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        print(json.dumps(mlperf_projection(cfg, weight_bytes, KVCache.bytes_per_token(cfg, kv_dtype), bw,
                                           args.tflops * 1e12, args.mlperf_requests, args.price_per_hour)))
    return 0


def mlperf_projection(cfg, weight_bytes: int, kv_bytes_per_token: int, read_bytes_s: float, flops_s: float,
                      requests: int, price_per_hour: float | None) -> dict:
    """MLPerf GPT-J Offline samples/s on the roofline (module docstring), labelled "projected"."""
    rows = requests * MLPERF_BEAMS
    context = MLPERF_PROMPT_TOKENS + MLPERF_OUTPUT_TOKENS / 2
    step_s = (weight_bytes + rows * context * kv_bytes_per_token) / read_bytes_s
    prefill_s = 2 * cfg.num_params() * MLPERF_PROMPT_TOKENS / flops_s
    samples_s = 1 / (MLPERF_OUTPUT_TOKENS * step_s / requests + prefill_s)
    row = {"projected": True, "mlperf_requests": requests, "beam_rows": rows, "step_ms": round(1000 * step_s, 2),
           "prefill_ms_per_sample": round(1000 * prefill_s, 2), "samples_per_s": round(samples_s, 2),
           "tokens_per_s": round(samples_s * MLPERF_OUTPUT_TOKENS, 1)}
    if price_per_hour:
        row |= {"price_per_hour": price_per_hour, "samples_per_dollar": round(samples_s * 3600 / price_per_hour)}
    return row


if __name__ == "__main__":
    sys.exit(main())
