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
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import queue
import random
import socket
import statistics
import sys
import time

import yaml

from app.args import AppArgs

APP_NAME = "gptj"


def log(msg: str) -> None:
    print(f"[bench.serve] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Workload and results


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: int
    concurrency: int | None  # closed loop, or
    rate: float | None  # open loop, with
    arrivals: list[float] | None  # the seconds after the start at which each request is sent

    @staticmethod
    def make(requests: int, prompt_tokens: int, max_tokens: int, concurrency: int | None, rate: float | None,
             vocab: int, seed: int = 0) -> "Workload":
        rng = random.Random(seed)
        prompts = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(requests)]
        arrivals = None
        if rate is not None:
            t, arrivals = 0.0, []
            for _ in range(requests):
                arrivals.append(t)
                t += rng.expovariate(rate)
        return Workload(prompts, max_tokens, concurrency, rate, arrivals)

    def describe(self) -> dict:
        return {"rate": self.rate} if self.rate is not None else {"concurrency": self.concurrency}


@dataclasses.dataclass
class Sample:
    sent: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    error: str | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summarize(system: str, workload: Workload, samples: list[Sample], seconds: float, **extra) -> dict:
    done = [s for s in samples if s.error is None and s.tokens]
    ttft = [s.first - s.sent for s in done]
    tpot = [(s.last - s.first) / (s.tokens - 1) for s in done if s.tokens > 1]
    tokens = sum(s.tokens for s in done)
    row = {"system": system, **extra, **workload.describe(), "requests": len(samples), "completed": len(done),
           "errors": len(samples) - len(done), "output_tokens": tokens, "seconds": round(seconds, 2),
           "out_tok_s": round(tokens / seconds, 1)}
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        for q in (50, 99):
            v = percentile(values, q)
            row[f"{name}_p{q}_s"] = None if v is None else round(v, 4)
    return row


# ---------------------------------------------------------------------------------------------
# The served side: streaming HTTP clients


async def _one_http(client, model: str, prompt: list[int], max_tokens: int, t0: float) -> Sample:
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    sample = Sample(sent=time.perf_counter() - t0)
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                sample.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return sample
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    sample.error = event["error"]["message"]
                    return sample
                n = len(event["choices"][0].get("token_ids") or ())
                if n:
                    now = time.perf_counter() - t0
                    sample.first = sample.first if sample.first is not None else now
                    sample.last = now
                    sample.tokens += n
    except httpx.HTTPError as e:
        sample.error = f"{type(e).__name__}: {e}"
    return sample


async def run_http(url: str, model: str, workload: Workload) -> tuple[list[Sample], float]:
    import httpx

    n = len(workload.prompts)
    limits = httpx.Limits(max_connections=max(n, 64), max_keepalive_connections=max(n, 64))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        one = lambda i: _one_http(client, model, workload.prompts[i], workload.max_tokens, t0)  # noqa: E731
        samples: list[Sample | None] = [None] * n
        if workload.arrivals is None:
            todo = iter(range(n))

            async def client_loop():
                for i in todo:
                    samples[i] = await one(i)

            await asyncio.gather(*(client_loop() for _ in range(workload.concurrency)))
        else:
            async def at(i: int):
                await asyncio.sleep(max(0.0, workload.arrivals[i] - (time.perf_counter() - t0)))
                samples[i] = await one(i)

            await asyncio.gather(*(at(i) for i in range(n)))
        return samples, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The engine-only side: the same workload through the driver, in this process


def run_engine(driver, workload: Workload) -> tuple[list[Sample], float]:
    from model.serving.driver import Request

    n = len(workload.prompts)
    samples: list[Sample | None] = [None] * n
    finished: queue.Queue[int] = queue.Queue()

    def submit(i: int, t0: float) -> None:
        sample = samples[i] = Sample(sent=time.perf_counter() - t0)

        def on_output(out, sample=sample, i=i):  # on the driver thread
            now = time.perf_counter() - t0
            if out.token_ids:
                sample.first = sample.first if sample.first is not None else now
                sample.last = now
                sample.tokens += len(out.token_ids)
            if out.finished:
                sample.error = out.error
                finished.put(i)

        driver.submit(Request(prompt_ids=workload.prompts[i], max_tokens=workload.max_tokens), on_output)

    t0 = time.perf_counter()
    if workload.arrivals is None:
        nxt = min(workload.concurrency, n)
        for i in range(nxt):
            submit(i, t0)
        for _ in range(n):
            finished.get()
            if nxt < n:
                submit(nxt, t0)
                nxt += 1
    else:
        for i in range(n):
            time.sleep(max(0.0, workload.arrivals[i] - (time.perf_counter() - t0)))
            submit(i, t0)
        for _ in range(n):
            finished.get()
    return samples, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# Deploying the app on a local Ray cluster


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalApp:
    """A local Ray cluster with Serve's proxy on a free port; `deploy(args)` (re)deploys the app."""

    def __enter__(self) -> "LocalApp":
        import ray
        from ray import serve

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
        self.url = f"http://127.0.0.1:{free_port()}"
        serve.start(http_options={"host": "127.0.0.1", "port": int(self.url.rsplit(":", 1)[1])})
        return self

    def deploy(self, args: AppArgs) -> None:
        from ray import serve

        from app.builder import build_app

        start = time.perf_counter()
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        log(f"app deployed (batch_max_size={args.batch_max_size}) in {time.perf_counter() - start:.0f}s")

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


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


def app_args(config: str, overrides: str | None) -> AppArgs:
    """The gptj application's args from a Serve config file, with JSON overrides on top."""
    with open(config) as f:
        apps = yaml.safe_load(f)["applications"]
    base = next((a.get("args", {}) for a in apps if a["name"] == APP_NAME), None)
    if base is None:
        raise SystemExit(f"{config} has no application named {APP_NAME!r}")
    return AppArgs(**{**base, **json.loads(overrides or "{}")})


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
    import httpx

    replicas = httpx.get(f"{url}/v1/stats", timeout=30).json()["replicas"]
    return sum(r["prefill_batches"] for r in replicas), sum(r["prefill_rows"] for r in replicas)


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
    from app.replica import load_driver

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
    with LocalApp() as app:
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
                             vocab=50257, seed=opts.seed)

    if opts.sweep_rates:
        title = (f"{args.checkpoint} preset, {args.slots} slots, {opts.prompt_tokens}-token prompts, "
                 f"{opts.max_tokens} new tokens, Poisson arrivals, {os.cpu_count()}-core CPU")
        sweep(args, [workload(float(r)) for r in opts.sweep_rates.split(",")], opts.plot, title)
        return 0
    work = workload(opts.rate)
    if opts.url:
        compare(opts.url, args, work, opts.repeats, not opts.no_engine)
    else:
        with LocalApp() as app:
            app.deploy(args)
            compare(app.url, args, work, opts.repeats, not opts.no_engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
