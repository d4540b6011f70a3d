"""The load generator: a seeded workload, sent to the served app over HTTP or straight to the engine's
driver, and the same summary row for both (throughput, TTFT, TPOT).

`bench.serve` runs it; a harness such as MLPerf LoadGen's can reuse `Workload`, `run_http`,
`run_engine` and `summarize`, and `bench.interference` / `bench.prefix` stream single requests with
`stream_completion` (every token's arrival time).

The workload: `requests` prompts of `prompt_tokens` random token ids (seeded), each asking for
exactly `max_tokens` greedy tokens (`ignore_eos`), sent as `stream: true` completions. With
`concurrency` C, C clients each send their next request when the previous one ends (closed loop);
with `rate` R, requests arrive as a Poisson process of R per second (open loop).
TTFT is send to the first token; TPOT (time per output token) is (last token - first token) /
(tokens - 1) per request. Throughput is all output tokens over the wall time of the whole run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import random
import time

from bench.harness import percentile


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
    """One request as its client saw it: when it was sent and when each of its tokens arrived
    (seconds from the run's start; the tokens of one event or output share its arrival time)."""

    sent: float
    times: list[float] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def tokens(self) -> int:
        return len(self.times)

    @property
    def first(self) -> float | None:
        return self.times[0] if self.times else None

    @property
    def last(self) -> float | None:
        return self.times[-1] if self.times else None


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


async def stream_completion(client, model: str, prompt: list[int], max_tokens: int, t0: float,
                            sample: Sample | None = None) -> Sample:
    """One `stream: true` completion of exactly `max_tokens` greedy tokens (`ignore_eos`) through
    `client` (an httpx.AsyncClient on the app's base URL), each token timestamped as its server-sent
    event arrives. `sample`, when given, is filled as the tokens arrive, so the caller can watch it."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "return_token_ids": True}
    sent = time.perf_counter() - t0
    if sample is None:
        sample = Sample(sent)
    sample.sent = sent
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
                    sample.times.extend(now for _ in range(n))
    except httpx.HTTPError as e:
        sample.error = f"{type(e).__name__}: {e}"
    return sample


async def run_http(url: str, model: str, workload: Workload) -> tuple[list[Sample], float]:
    import httpx

    n = len(workload.prompts)
    limits = httpx.Limits(max_connections=max(n, 64), max_keepalive_connections=max(n, 64))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        one = lambda i: stream_completion(client, model, workload.prompts[i], workload.max_tokens, t0)  # noqa: E731
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
    from model.serving.request import Request

    n = len(workload.prompts)
    samples: list[Sample | None] = [None] * n
    finished: queue.Queue[int] = queue.Queue()

    def submit(i: int, t0: float) -> None:
        sample = samples[i] = Sample(sent=time.perf_counter() - t0)

        def on_output(out, sample=sample, i=i):  # on the driver thread
            now = time.perf_counter() - t0
            sample.times.extend(now for _ in out.token_ids)
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
