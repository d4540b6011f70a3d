"""Serving benchmark: the app over HTTP (streaming clients) against the engine alone, same workload, same run.

    # deploy the app on a local Ray cluster (this process starts and stops it), 32 concurrent streams:
    flock /tmp/ray-tests.lock env RAY_AUTH_MODE=disabled python -m bench.serve \\
        --args '{"checkpoint": "small", "prompt_buckets": [64], "slots": 16, ...}' --concurrency 32
    # drive an app that is already running (give the same args it was deployed with):
    python -m bench.serve --url http://127.0.0.1:8000 --config serve_config.yaml --concurrency 32
    # Poisson arrivals instead of closed-loop clients:
    python -m bench.serve --args '{...}' --rate 1.5
    # throughput vs latency over arrival rates, dynamic batching on and off, plotted (deploys twice):
    python -m bench.serve --args '{...}' --sweep-rates 0.5,1,1.5,2,3 --plot docs/serve_throughput_latency.png

The workload: `--requests` prompts of `--prompt-tokens` random token ids (seeded), each asking for
exactly `--max-tokens` greedy tokens (`ignore_eos`), sent as `stream: true` completions. With
`--concurrency C`, C clients each send their next request when the previous one ends (closed loop);
with `--rate R`, requests arrive as a Poisson process of R per second (open loop).

The engine-only side runs the identical workload (same prompts, same arrival pattern) through
`model.serving.driver.Driver` in this process, built by the replica's own `load_driver` from the same args:
the ceiling the serving layers can reach on this machine. It runs while the app sits idle.

Output, one JSON object per line on stdout:
    {"system": "served"|"engine", "batch_max_size", "prefills", "mean_prefill_batch",
     "concurrency"|"rate", "requests", "completed", "errors", "output_tokens", "seconds", "out_tok_s",
     "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s"}
    {"served_out_tok_s_median", "engine_out_tok_s_median", "served_over_engine": the ratio of the two}
With `--repeats R`, served and engine-only runs alternate R times, so background load on the machine
weighs on both alike; the ratio is that of the medians.
TTFT is send to the first token; TPOT (time per output token) is (last token - first token) /
(tokens - 1) per request. Throughput is all output tokens over the wall time of the whole run.
Progress goes to stderr. The load generator is `bench.load`; the local cluster, `bench.harness`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys

from app.args import AppArgs
from bench.harness import LocalApp, app_args, logger, replica_totals
from bench.load import Workload, run_engine, run_http, summarize
from model.nn.config import GPT2_VOCAB_SIZE

log = logger("bench.serve")


# ---------------------------------------------------------------------------------------------
# The plot


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, style in (("on", "o-"), ("off", "s--")):
        points = sorted((r for r in rows if r["batching"] == label), key=lambda r: r["rate"])
        if not points:
            continue
        x = [r["out_tok_s"] for r in points]
        for ax, metric in zip(axes, ("ttft", "tpot")):
            line, = ax.plot(x, [r[f"{metric}_p50_s"] * 1000 for r in points], style, label=f"batching {label}, p50")
            ax.plot(x, [r[f"{metric}_p99_s"] * 1000 for r in points], style, alpha=0.35, color=line.get_color(),
                    label=f"batching {label}, p99")
            for r, xi in zip(points, x):
                ax.annotate(f"{r['rate']:g}/s", (xi, r[f"{metric}_p50_s"] * 1000), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    for ax, name, scale in zip(axes, ("time to first token (ms)", "time per output token (ms)"), ("log", "linear")):
        ax.set_xlabel("served throughput (output tokens/s)")
        ax.set_ylabel(name)
        ax.set_yscale(scale)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"plot written to {path}")


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="serve_config.yaml", help="Serve config holding the app's args")
    p.add_argument("--args", help="JSON object of AppArgs fields overriding the config's")
    p.add_argument("--url", help="drive this running app (default: deploy it on a local Ray cluster)")
    load = p.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=int, help="closed loop: this many streaming clients (default 32)")
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests per second")
    load.add_argument("--sweep-rates", help="comma-separated arrival rates, batching on and off (needs no --url)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-engine", action="store_true", help="skip the engine-only runs")
    p.add_argument("--repeats", type=int, default=1, help="served and engine-only runs, alternating")
    p.add_argument("--plot", help="with --sweep-rates: write the throughput-latency PNG here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.sweep_rates and args.url:
        p.error("--sweep-rates redeploys the app (batch_max_size 1 for 'off'), so it cannot use --url")
    if args.concurrency is None and args.rate is None and not args.sweep_rates:
        args.concurrency = 32
    return args


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def prefill_counts(url: str) -> tuple[int, int]:
    """(prefill batches, prefilled requests) so far, summed over the app's replicas."""
    totals = replica_totals(url, "prefill_batches", "prefill_rows")
    return totals["prefill_batches"], totals["prefill_rows"]


def prefill_fields(batches: int, rows: int) -> dict:
    return {"prefills": batches, "mean_prefill_batch": round(rows / batches, 2) if batches else None}


def served_row(url: str, args: AppArgs, workload: Workload, **extra) -> dict:
    batches, rows = prefill_counts(url)
    samples, seconds = asyncio.run(run_http(url, args.model_name, workload))
    batches_after, rows_after = prefill_counts(url)
    row = summarize("served", workload, samples, seconds, batch_max_size=args.batch_max_size, **extra,
                    **prefill_fields(batches_after - batches, rows_after - rows))
    emit(row)
    return row


def load_engine(args: AppArgs):
    from app.driver import load_driver

    log("engine-only: loading and warming up the same engine in this process")
    driver = load_driver(args)
    driver.start()
    return driver


def engine_row(driver, args: AppArgs, workload: Workload) -> dict:
    batches, rows = driver.stats["prefill_batches"], driver.stats["prefill_rows"]
    samples, seconds = run_engine(driver, workload)
    row = summarize("engine", workload, samples, seconds, batch_max_size=args.batch_max_size,
                    **prefill_fields(driver.stats["prefill_batches"] - batches, driver.stats["prefill_rows"] - rows))
    emit(row)
    return row


def compare(url: str, args: AppArgs, workload: Workload, repeats: int, engine: bool) -> None:
    """Served and engine-only runs, alternating `repeats` times (the machine's other load then
    weighs on both alike), and the ratio of their median throughputs."""
    driver = load_engine(args) if engine else None
    served, alone = [], []
    try:
        for _ in range(repeats):
            served.append(served_row(url, args, workload)["out_tok_s"])
            if driver is not None:  # while the app sits idle
                alone.append(engine_row(driver, args, workload)["out_tok_s"])
    finally:
        if driver is not None:
            driver.stop()
    if alone:
        emit({"served_out_tok_s_median": statistics.median(served), "engine_out_tok_s_median": statistics.median(alone),
              "served_over_engine": round(statistics.median(served) / statistics.median(alone), 3)})


def sweep(args: AppArgs, workloads: list[Workload], plot_path: str | None, title: str) -> None:
    """Every arrival rate with dynamic batching on (args as given) and off (one request per prefill)."""
    off = args.model_copy(update={"batch_max_size": 1, "prefill_batch_buckets": (1,)})
    rows = []
    with LocalApp(log) as app:
        for label, variant in (("on", args), ("off", off)):
            app.deploy(variant)
            rows += [served_row(app.url, variant, w, batching=label) for w in workloads]
    if plot_path:
        plot(rows, plot_path, title)


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args = app_args(opts.config, opts.args)

    def workload(rate: float | None) -> Workload:
        return Workload.make(opts.requests, opts.prompt_tokens, opts.max_tokens, opts.concurrency, rate,
                             vocab=GPT2_VOCAB_SIZE, seed=opts.seed)

    if opts.sweep_rates:
        title = (f"{args.checkpoint} preset, {args.slots} slots, {opts.prompt_tokens}-token prompts, "
                 f"{opts.max_tokens} new tokens, Poisson arrivals, {os.cpu_count()}-core CPU")
        sweep(args, [workload(float(r)) for r in opts.sweep_rates.split(",")], opts.plot, title)
        return 0
    work = workload(opts.rate)
    if opts.url:
        compare(opts.url, args, work, opts.repeats, not opts.no_engine)
    else:
        with LocalApp(log) as app:
            app.deploy(args)
            compare(app.url, args, work, opts.repeats, not opts.no_engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
