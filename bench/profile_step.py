"""Where one decode step's time goes: an XLA profile of the engine's compiled step, by op kind.

    python -m bench.profile_step --checkpoint small --batch 1 [--dtype float32] [--steps 20] [--top 10]

Runs `--steps` decode steps of a warmed-up engine (cache of 192 positions, as bench.engine's
128 + 64) under `jax.profiler.trace` and sums the trace's op events. Prints one JSON object:
{"device", "batch", "steps", "traced_ms_per_step", "by_kind": {kind: ms per step}, "top_ops":
[[op, ms per step], ...]}. A kind is an op's name up to its first dot (`dot`, `copy`, a fusion kind).
Tracing slows the step; read the shares, not the absolute times. On CPU, per-op events need
XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true, which this sets when XLA_FLAGS does not mention it.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

# Host-side trace events (Python frames, the executor and its waits) are not ops.
NOT_OPS = ("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "CommonPjRtLoadedExecutable", "end: ",
           "ParseArguments", "Handle inputs")


def op_times(trace_dir: str, steps: int) -> collections.Counter:
    """ms per step of every op event in the trace under `trace_dir`."""
    [path] = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    totals: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS):
            totals[e["name"]] += e["dur"] / 1000 / steps  # microseconds in the trace
    return totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="small", help="a preset or a checkpoint path")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--batch", type=int, default=1, help="decode slots")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=10, help="how many single ops to list")
    args = p.parse_args(argv)
    if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

    import jax

    from model import ckpt
    from model.engine.paged import EngineConfig, PagedEngine
    from model.serving.pages import PagePool

    loaded = ckpt.load(args.checkpoint, dtype=args.dtype, progress=False)
    config = EngineConfig(prompt_buckets=(128,), batch_buckets=(args.batch,), slots=args.batch, max_cache_len=192)
    engine = PagedEngine(loaded.weights, loaded.cfg, config)
    engine.warmup(progress=False)
    state = engine.init_decode_state()
    pages = PagePool(engine.page_layout, args.batch)
    for slot in range(args.batch):  # every slot mid-generation: 128 + 32 tokens
        pages.allocate(slot, 161)
        pages.lengths[slot] = 160
    for _ in range(5):
        state, out = engine.generate(state, pages)
    jax.block_until_ready(out)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, out = engine.generate(state, pages)
            jax.block_until_ready(out)
        ops = op_times(trace_dir, args.steps)
    kinds: collections.Counter = collections.Counter()
    for name, ms in ops.items():
        kinds[name.split(".")[0]] += ms
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "batch": args.batch, "steps": args.steps,
        "traced_ms_per_step": round(sum(ops.values()), 3),
        "by_kind": {k: round(v, 3) for k, v in kinds.most_common()},
        "top_ops": [[name, round(ms, 3)] for name, ms in ops.most_common(args.top)],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
