"""Soak test: a bounded, mixed load on the served app for minutes; errors by kind, latency, memory.

    # deploy the app from serve_config.yaml on a local Ray cluster (this process starts and stops it):
    flock /tmp/ray-tests.lock env RAY_AUTH_MODE=disabled python -m bench.soak            # 3 minutes
    flock /tmp/ray-tests.lock env RAY_AUTH_MODE=disabled python -m bench.soak --duration 3600 --rate 6
    # an app that is already running (give the args it was deployed with; memory needs its Ray cluster):
    python -m bench.soak --url http://127.0.0.1:8000 --config serve_config.yaml [--ray-address auto]

Load: requests arrive as a Poisson process of `--rate` per second for `--duration` seconds (seeded),
each one of these kinds, in these proportions:
    stream      40%  streamed completion, sampled (temperature 0.8, seeded) or greedy, to the end
    complete    25%  plain completion, one or two token-id prompts, n of 1 or 2
    saxml       15%  Saxml POST /generate
    disconnect  10%  streamed completion whose client leaves after the first event
    invalid     10%  a malformed request (bad JSON, wrong type, token id out of range, ...)
Every valid request asks for an exact number of tokens (`ignore_eos`), so a response that comes back
short is caught. At most `--max-in-flight` requests are open at once (the load is bounded on both
sides: later arrivals wait, and are counted late). At the end the app must go idle: no slot held,
nothing waiting, nothing held by the batcher.

Outcomes: "ok" (the full answer), "left" (a disconnect, as planned), "rejected" (an invalid request
refused with a 4xx, as it should be); anything else is an error, by kind: "http_<status>" (with
the status the server gave), "stream_error" (an error event inside a stream), "short" (fewer tokens
than asked), "accepted_invalid" (a malformed request that got a 2xx), "timeout", or the transport
exception's name. Memory: the resident set size of every Serve replica process of the app (summed
per deployment), sampled every `--memory-every` seconds; it needs this process to be connected to
the app's Ray cluster (always the case when it deploys the app itself).

Output: one JSON object on stdout (and in `--out`):
    {"duration_s", "rate", "requests", "late", "outcomes": {kind: {outcome: n}}, "errors": {kind: n},
     "latency_s": {"p50", "p90", "p99", "max"}, "ttft_s": {...}, "memory_mb": {"start", "end", "max"}
     (deployment -> MB), "idle_at_end", "stats_at_end", "machine"}
Latency is send to last byte of successful "stream", "complete" and "saxml" requests; TTFT is send to
the first token event of successful streams. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import platform
import random
import sys
import time

from app.args import APP_NAME, AppArgs
from bench.harness import LocalApp, app_args, is_idle, logger, percentiles, replica_memory_mb
from model.nn.config import GPT2_VOCAB_SIZE

KIND_WEIGHTS = {"stream": 40, "complete": 25, "saxml": 15, "disconnect": 10, "invalid": 10}
INVALID_BODIES = [  # (what, raw body): each must be refused with a 4xx
    ("bad JSON", b'{"model": "m", "prompt": '),
    ("wrong type", {"prompt": "hello", "max_tokens": "ten"}),
    ("token id out of range", {"prompt": [10**9]}),
    ("negative token id", {"prompt": [[1, -7]]}),
    ("NaN temperature", b'{"model": "M", "prompt": "hi", "temperature": NaN}'),
    ("too many stops", {"prompt": "hello", "stop": ["s"] * 10_000}),
]


log = logger("bench.soak")


# ---------------------------------------------------------------------------------------------
# The load


@dataclasses.dataclass
class Result:
    kind: str
    outcome: str  # "ok" | "left" | "rejected" | an error kind
    latency_s: float | None = None
    ttft_s: float | None = None


class Load:
    """Builds and sends the requests of one soak run (see the module docstring)."""

    def __init__(self, url: str, args: AppArgs, seed: int, headers: dict[str, str]):
        self.url = url
        self.model = args.model_name
        self.headers = headers
        self.rng = random.Random(seed)
        self.max_prompt = min(args.prompt_buckets[-1], 48)
        self.max_new = 32

    def prompt_ids(self) -> list[int]:
        return [self.rng.randrange(GPT2_VOCAB_SIZE) for _ in range(self.rng.randint(1, self.max_prompt))]

    def plan(self, kind: str) -> tuple[str, bytes | dict, int]:
        """(path, body, tokens expected per choice in total) for one request of `kind`."""
        rng, max_tokens = self.rng, self.rng.randint(4, self.max_new)
        base = {"model": self.model, "max_tokens": max_tokens, "ignore_eos": True}
        if kind in ("stream", "disconnect"):
            sampled = rng.random() < 0.5
            body = {**base, "prompt": self.prompt_ids(), "stream": True, "return_token_ids": True,
                    "temperature": 0.8 if sampled else 0.0, "seed": rng.randrange(2**31) if sampled else None}
            return "/v1/completions", body, max_tokens
        if kind == "complete":
            prompts = [self.prompt_ids() for _ in range(rng.randint(1, 2))]
            n = rng.randint(1, 2)
            body = {**base, "prompt": prompts, "n": n, "temperature": 0.0}
            return "/v1/completions", body, max_tokens * n * len(prompts)
        if kind == "saxml":
            words = " ".join(rng.choice(["the", "model", "serves", "tokens", "fast", "on", "TPU"])
                             for _ in range(rng.randint(1, 10)))
            body = {"model": self.model, "query": words,
                    "extra_inputs": {"temperature": 0.0, "per_example_max_decode_steps": max_tokens}}
            return "/generate", body, max_tokens
        _what, body = rng.choice(INVALID_BODIES)
        if isinstance(body, dict):
            body = {"model": self.model, **body}
        return "/v1/completions", body, 0

    async def send(self, client, kind: str) -> Result:
        import httpx

        path, body, expected = self.plan(kind)
        start = time.perf_counter()
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json", **self.headers}
        try:
            if kind in ("stream", "disconnect"):
                return await self._stream(client, kind, path, content, headers, expected, start)
            r = await client.post(path, content=content, headers=headers)
        except httpx.TimeoutException:
            return Result(kind, "timeout")
        except httpx.HTTPError as e:
            return Result(kind, type(e).__name__)
        latency = time.perf_counter() - start
        if kind == "invalid":
            return Result(kind, "rejected" if 400 <= r.status_code < 500 else
                          ("accepted_invalid" if r.status_code < 300 else f"http_{r.status_code}"))
        if r.status_code != 200:
            return Result(kind, f"http_{r.status_code}")
        data = r.json()
        got = data["usage"]["completion_tokens"] if kind == "complete" else None
        if kind == "saxml":
            return Result(kind, "ok", latency)  # Saxml's response carries no token count
        return Result(kind, "ok" if got == expected else "short", latency)

    async def _stream(self, client, kind, path, content, headers, expected, start) -> Result:
        tokens, ttft = 0, None
        async with client.stream("POST", path, content=content, headers=headers) as r:
            if r.status_code != 200:
                return Result(kind, f"http_{r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[len("data: "):])
                if "error" in event:
                    return Result(kind, "stream_error")
                if ttft is None:
                    ttft = time.perf_counter() - start
                if kind == "disconnect":
                    return Result(kind, "left")  # leaving the `async with` closes the connection
                tokens += sum(len(c.get("token_ids") or ()) for c in event["choices"])
        latency = time.perf_counter() - start
        return Result(kind, "ok" if tokens == expected else "short", latency, ttft)


async def run_load(url: str, args: AppArgs, duration_s: float, rate: float, max_in_flight: int, seed: int,
                   headers: dict[str, str], on_tick) -> tuple[list[Result], int]:
    """Poisson arrivals for `duration_s`; returns every result and how many arrivals had to wait."""
    import httpx

    load = Load(url, args, seed, headers)
    kinds, weights = zip(*KIND_WEIGHTS.items())
    slots = asyncio.Semaphore(max_in_flight)
    results: list[Result] = []
    late = 0

    async def one(kind: str) -> None:
        try:
            results.append(await load.send(client, kind))
        finally:
            slots.release()

    limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        tasks = set()
        start = next_at = time.perf_counter()
        while next_at - start < duration_s:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            if slots.locked():
                late += 1
            await slots.acquire()
            task = asyncio.create_task(one(load.rng.choices(kinds, weights)[0]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += load.rng.expovariate(rate)
            on_tick(time.perf_counter() - start, len(results))
        await asyncio.gather(*tasks)
    return results, late


# ---------------------------------------------------------------------------------------------
# The report


def app_stats(url: str, headers: dict[str, str]) -> dict:
    import httpx

    return httpx.get(f"{url}/v1/stats", headers=headers, timeout=30).json()


def wait_idle(url: str, headers: dict[str, str], timeout_s: float = 60) -> tuple[bool, dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        stats = app_stats(url, headers)
        if is_idle(stats) or time.monotonic() > deadline:
            return is_idle(stats), stats
        time.sleep(0.2)


def report(results: list[Result], late: int, duration_s: float, rate: float, memory: list[dict[str, float]],
           idle: bool, stats: dict) -> dict:
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in results:
        outcomes[r.kind][r.outcome] += 1
    expected = {"ok", "left", "rejected"}
    errors = collections.Counter(r.outcome for r in results if r.outcome not in expected)
    memory = [m for m in memory if m]
    return {
        "duration_s": duration_s, "rate": rate, "requests": len(results), "late": late,
        "outcomes": {k: dict(v) for k, v in sorted(outcomes.items())},
        "errors": dict(errors),
        "latency_s": percentiles([r.latency_s for r in results if r.outcome == "ok" and r.latency_s is not None]),
        "ttft_s": percentiles([r.ttft_s for r in results if r.outcome == "ok" and r.ttft_s is not None]),
        "memory_mb": {
            "start": memory[0] if memory else None,
            "end": memory[-1] if memory else None,
            "max": {d: max(m.get(d, 0.0) for m in memory) for d in memory[0]} if memory else None,
        },
        "idle_at_end": idle,
        "stats_at_end": stats,
        "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {platform.system()}",
    }


def soak(url: str, args: AppArgs, opts, app_name: str, measure_memory: bool) -> dict:
    headers = {"Authorization": f"Bearer {os.environ[opts.api_key_env]}"} if opts.api_key_env else {}
    memory: list[dict[str, float]] = []
    last_sample = [float("-inf")]

    def sample_memory(elapsed: float, done: int) -> None:
        if elapsed - last_sample[0] >= opts.memory_every:
            last_sample[0] = elapsed
            if measure_memory:
                memory.append(replica_memory_mb(app_name))
            log(f"{elapsed:5.0f}s: {done} requests done; memory {memory[-1] if memory else 'n/a'}")

    sample_memory(0.0, 0)
    results, late = asyncio.run(run_load(url, args, opts.duration, opts.rate, opts.max_in_flight, opts.seed,
                                         headers, sample_memory))
    idle, stats = wait_idle(url, headers)
    if measure_memory:
        memory.append(replica_memory_mb(app_name))
    return report(results, late, opts.duration, opts.rate, memory, idle, stats)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="serve_config.yaml", help="Serve config holding the app's args")
    p.add_argument("--args", help="JSON object of AppArgs fields overriding the config's")
    p.add_argument("--url", help="drive this running app (default: deploy it on a local Ray cluster)")
    p.add_argument("--ray-address", help="with --url: connect to this Ray cluster to read replica memory")
    p.add_argument("--app-name", default=APP_NAME, help="the Serve application's name (for its replicas' memory)")
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load (default 180)")
    p.add_argument("--rate", type=float, default=4.0, help="requests per second, Poisson (default 4)")
    p.add_argument("--max-in-flight", type=int, default=32, help="most requests open at once (default 32)")
    p.add_argument("--memory-every", type=float, default=15.0, help="seconds between memory samples")
    p.add_argument("--api-key-env", help="send the bearer token held in this environment variable")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON report here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args = app_args(opts.config, opts.args)
    if opts.url:
        import ray

        if opts.ray_address and not ray.is_initialized():
            ray.init(address=opts.ray_address)
        row = soak(opts.url.rstrip("/"), args, opts, opts.app_name, ray.is_initialized())
    else:
        with LocalApp(log) as app:
            app.deploy(args)
            row = soak(app.url, args, opts, APP_NAME, True)
    text = json.dumps(row)
    print(text, flush=True)
    if opts.out:
        with open(opts.out, "w") as f:
            f.write(text + "\n")
    return 0 if not row["errors"] and row["idle_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
