"""Interference benchmark: how long the requests already decoding stall while one long prompt is
prefilled, without and with chunked prefill, on the same weights in one run.

    python -m bench.interference --checkpoint PATH_OR_PRESET --decoders 7 --long-prompt 1900 \\
        [--chunk 256 | --chunk 64,128,256,512] [--new-tokens 64] [--max-cache-len L] [--repeats 3] \\
        [--dtype float32|bfloat16] [--backend engine|http [--join URL]] [--json]

A run: --decoders requests with 32-token prompts and --new-tokens greedy tokens each are submitted
together; once each has received 8 tokens, one --long-prompt-token prompt (one new token) is
submitted, and the run goes on until every request has ended. It is done unchunked
(prefill_chunk_tokens=None) and chunked with each --chunk (a comma-separated list is a sweep), every
engine warmed up (every shape compiled) before anything is timed, --repeats times each.

Backends:
- engine (default): paged engines over the same weights in this process, their pools on the device
  together; the repeats alternate (unchunked, each chunk, unchunked, ...), each on a fresh driver, so
  that a machine whose speed drifts (a shared CPU) slows all alike and the spread between repeats
  shows. The driver is stepped here, one `step()` at a time, and each output is timestamped as its
  callback receives it: what a streaming client would see, without the serving layers.
- http: the served app (app.builder.build_app over the same engine settings, relaying each token as it
  comes: stream_chunk_tokens 1, stream_chunk_ms 0; no batch wait) on a local Ray cluster this process
  starts and stops (run it under `flock /tmp/ray-tests.lock`, with RAY_AUTH_MODE=disabled), or, with
  --join URL, deployed into the running cluster whose Serve proxy is at URL as the application
  "bench-interference" at /bench-interference and deleted at the end. The requests are `stream: true`
  /v1/completions over real HTTP; each token is timestamped as its server-sent event arrives. One
  deployment per setting, one after the other (unchunked, then each chunk), each for all its repeats.

One row per run, printed as it is measured (with --json one JSON object per line, else key=value):
    {"backend", "chunked": bool, "chunk": C | null, "repeat": r, "median_step_ms", "max_gap_ms",
     "long_ttft_ms", "gaps_during_prefill", "median_free_step_ms", "prefill_chunks", "compilations",
     ...the run's shape}
- median_step_ms: the median gap between two consecutive tokens of one decoding request, over the
  whole run (every decoder, every gap): the ordinary step, as a decoding client sees it (as long as
  most gaps do not overlap the prefill: small chunks need enough --new-tokens);
- max_gap_ms: the longest such gap among those that overlap the long prompt's prefill (from its
  submit to its first token; `gaps_during_prefill` says how many there were): how long the prefill
  stalled the decoders;
- median_free_step_ms: the median of the gaps that do not overlap the prefill: the decode step alone;
- long_ttft_ms: the long prompt's submit to its first token;
- prefill_chunks: chunks prefilled during the run (the engine's driver, or the app's /v1/stats);
- compilations: XLA compilations during the run (in this process, or in the app's replica since its
  warm-up); 0: every shape came from warm-up.
The issue's goals are for chunked rows: max_gap_ms <= 3x median_step_ms, and long_ttft_ms <= 1.3x the
unchunked rows'. The run fails (exit 1) if a decoder ended before the long prompt's first token:
--new-tokens was too few to measure the whole prefill.

Engine: prompt buckets (32, --max-cache-len) (the long prompt's validation needs a bucket that holds
it; with chunking whole prompts are prefilled only up to the chunk, longer ones chunk by chunk), batch
buckets (1, decoders + 1), slots decoders + 1, page size 16, the pool the dense equivalent (every slot
can hold a whole context: no preemption), no prefix caching (the prompts share nothing). Progress goes
to stderr; results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from bench.engine import random_prompts
from bench.harness import (LocalApp, add_backend_args, check_backend_args, logger, print_row, replica_totals,
                           served_context)
from model.nn.config import GPT2_VOCAB_SIZE

log = logger("bench.interference")
PAGE_SIZE = 16
SHORT_PROMPT = 32  # tokens of each decoding request's prompt, and the prompt bucket that holds them
LEAD_TOKENS = 8  # tokens every decoder has received before the long prompt arrives
HTTP_APP = "bench-interference"  # the application's name (and route) with --join


def chunk_sizes(text: str) -> tuple[int, ...]:
    """--chunk: one size or a comma-separated sweep, each a positive multiple of the page size."""
    try:
        sizes = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    bad = [c for c in sizes if c < PAGE_SIZE or c % PAGE_SIZE]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad} must be positive multiples of the page size {PAGE_SIZE}")
    if len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a chunk size")
    return sizes


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.interference", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="preset (tiny, small, gptj-6b), checkpoint dir or gs:// URI")
    p.add_argument("--decoders", type=int, default=7, help="requests decoding when the long prompt arrives")
    p.add_argument("--long-prompt", type=int, default=1900, help="tokens of the long prompt")
    p.add_argument("--chunk", type=chunk_sizes, default=(256,),
                   help="prefill_chunk_tokens of the chunked runs: one, or a comma-separated sweep")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each decoding request generates")
    p.add_argument("--max-cache-len", type=int, default=None, help="context of a sequence (default: n_positions)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_backend_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object per run on stdout (default: key=value)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.decoders < 1:
        p.error("--decoders must be >= 1")
    if args.new_tokens <= LEAD_TOKENS:
        p.error(f"--new-tokens must be more than the {LEAD_TOKENS} tokens decoded before the long prompt arrives")
    if args.long_prompt <= max(args.chunk):
        p.error(f"--long-prompt {args.long_prompt} must be longer than --chunk {max(args.chunk)}, "
                "or nothing is chunked")
    check_backend_args(p, args)
    return args


def shape_error(args, max_cache_len: int, n_positions: int) -> str | None:
    """Why the run's shape cannot be measured with this context, or None."""
    if not SHORT_PROMPT < max_cache_len <= n_positions:
        return (f"--max-cache-len {max_cache_len} must exceed {SHORT_PROMPT} and be at most the model's "
                f"{n_positions} positions")
    if args.long_prompt + 1 > max_cache_len or SHORT_PROMPT + args.new_tokens > max_cache_len:
        return (f"the long prompt + 1 token ({args.long_prompt + 1}) and a decoder's {SHORT_PROMPT} + --new-tokens "
                f"({SHORT_PROMPT + args.new_tokens}) must fit max_cache_len {max_cache_len}")
    if max(args.chunk) > max_cache_len:
        return f"--chunk {max(args.chunk)} exceeds max_cache_len {max_cache_len}"
    return None


def app_args(args, max_cache_len: int, chunk: int | None):
    """The app's args for one setting: the engine of the module docstring (both backends build it
    from these), each token relayed to its stream as it comes, no batch wait."""
    from app.args import AppArgs

    slots = args.decoders + 1
    return AppArgs(checkpoint=args.checkpoint, dtype=args.dtype, prompt_buckets=(SHORT_PROMPT, max_cache_len),
                   prefill_batch_buckets=(1, slots), slots=slots, batch_max_size=slots, max_cache_len=max_cache_len,
                   page_size=PAGE_SIZE, kv_pages=slots * -(-max_cache_len // PAGE_SIZE), prefill_chunk_tokens=chunk,
                   enable_prefix_caching=False, batch_wait_ms=0, stream_chunk_tokens=1, stream_chunk_ms=0)


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    return random_prompts(1, length, vocab, seed)[0]


def decoder_prompts(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The decoders' prompts and the long prompt (seeded: the same in every run and backend)."""
    return ([random_prompt(SHORT_PROMPT, vocab, seed=i) for i in range(args.decoders)],
            random_prompt(args.long_prompt, vocab, seed=args.decoders))


class Recorder:
    """Each request's token arrival times (time.perf_counter()), from the outputs the driver delivers."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.finished: set[str] = set()

    def callback(self, request_id: str):
        self.times[request_id] = []

        def on_output(out) -> None:
            if out.error is not None:
                raise RuntimeError(f"request {request_id} failed: {out.error}")
            now = time.perf_counter()
            self.times[request_id].extend(now for _ in out.token_ids)
            if out.finished:
                self.finished.add(request_id)

        return on_output


def step_until(driver, done) -> None:
    """Step `driver` until `done()` holds; fails if the driver runs out of work first."""
    while not done():
        if not driver.has_work():
            raise RuntimeError("the driver ran out of work before the condition held")
        driver.step()


class TooFewTokens(Exception):
    """A decoder ended before the long prompt's first token: part of the prefill went unmeasured."""


def measure(decoder_times: list[list[float]], submitted: float, first: float, new_tokens: int) -> dict:
    """The row's figures from each decoder's token times, the long prompt's submit and its first token
    (see the module docstring)."""
    early = sum(times[-1] < first for times in decoder_times)
    if early:
        raise TooFewTokens(f"{early} decoders ended before the long prompt's first token: "
                           f"--new-tokens {new_tokens} is too few to measure the whole prefill")
    pairs = [(prev, nxt) for times in decoder_times for prev, nxt in zip(times, times[1:])]
    during = [nxt - prev for prev, nxt in pairs if nxt > submitted and prev < first]
    free = [nxt - prev for prev, nxt in pairs if not (nxt > submitted and prev < first)]
    return {"median_step_ms": round(1000 * statistics.median(nxt - prev for prev, nxt in pairs), 3),
            "max_gap_ms": round(1000 * max(during), 3), "long_ttft_ms": round(1000 * (first - submitted), 3),
            "gaps_during_prefill": len(during),
            "median_free_step_ms": round(1000 * statistics.median(free), 3) if free else None}


def name(chunk: int | None) -> str:
    return f"chunk {chunk}" if chunk else "unchunked"


def row_of(args, backend: str, chunk: int | None, repeat: int, figures: dict, prefill_chunks: int,
           compilations: int, max_cache_len: int) -> dict:
    row = {"backend": backend, "chunked": chunk is not None, "chunk": chunk, "repeat": repeat, **figures,
           "prefill_chunks": prefill_chunks, "compilations": compilations,
           "decoders": args.decoders, "long_prompt": args.long_prompt, "new_tokens": args.new_tokens,
           "max_cache_len": max_cache_len, "page_size": PAGE_SIZE, "dtype": args.dtype}
    log(f"{name(chunk)}: median step {row['median_step_ms']} ms, max gap {row['max_gap_ms']} ms, "
        f"long TTFT {row['long_ttft_ms']} ms")
    return row


# ---------------------------------------------------------------------------------------------
# The engine backend


def make_engine(loaded, mesh, args, max_cache_len: int, chunk: int | None):
    """A paged engine over `loaded`'s weights, every shape compiled."""
    from model.engine.paged import EngineConfig, PagedEngine

    config = EngineConfig(**app_args(args, max_cache_len, chunk).engine_options())
    engine = PagedEngine(loaded.weights, loaded.cfg, config, mesh)
    log(f"{name(chunk)}: warm-up")
    engine.warmup(progress=False)
    log(f"{name(chunk)}: warm-up took {engine.warmup_seconds:.1f}s")
    return engine


def run(engine, args, chunk: int | None, repeat: int) -> dict:
    """One run on a fresh driver (an empty pool, zero counters) over `engine`; its row."""
    from model.engine.compilations import compilation_count
    from model.serving.driver import Driver
    from model.serving.request import Request
    from model.text.tokenizer import Tokenizer

    driver = Driver(engine, Tokenizer.gpt2())
    compiled_before = compilation_count()
    rec = Recorder()
    short, long_prompt = decoder_prompts(args, engine.model_config.real_vocab_size)
    decoders = [Request(prompt_ids=prompt, max_tokens=args.new_tokens) for prompt in short]
    driver.submit_many([(r, rec.callback(r.request_id)) for r in decoders])
    step_until(driver, lambda: all(len(rec.times[r.request_id]) >= LEAD_TOKENS for r in decoders))
    long = Request(prompt_ids=long_prompt, max_tokens=1)
    on_long = rec.callback(long.request_id)
    log(f"{name(chunk)}, repeat {repeat + 1}/{args.repeats}: {args.decoders} decoding; "
        f"submitting the {args.long_prompt}-token prompt")
    submitted = time.perf_counter()
    driver.submit(long, on_long)
    step_until(driver, lambda: rec.times[long.request_id])
    first = rec.times[long.request_id][0]
    step_until(driver, lambda: not driver.has_work())
    figures = measure([rec.times[r.request_id] for r in decoders], submitted, first, args.new_tokens)
    return row_of(args, "engine", chunk, repeat, figures, driver.stats["prefill_chunks"],
                  compilation_count() - compiled_before, engine.cache_len)


def main_engine(args) -> int:
    import jax

    from model import ckpt
    from model.nn.sharding import make_mesh

    log(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    mesh = make_mesh(1)
    loaded = ckpt.load(args.checkpoint, mesh=mesh, dtype=args.dtype)
    max_cache_len = args.max_cache_len or loaded.cfg.n_positions
    error = shape_error(args, max_cache_len, loaded.cfg.n_positions)
    if error:
        log(f"error: {error}")
        return 2
    engines = {chunk: make_engine(loaded, mesh, args, max_cache_len, chunk) for chunk in (None, *args.chunk)}
    for repeat in range(args.repeats):
        for chunk, engine in engines.items():
            try:
                print_row(run(engine, args, chunk, repeat), args.json)
            except TooFewTokens as e:
                log(f"error: {e}")
                return 1
    return 0


# ---------------------------------------------------------------------------------------------
# The http backend


async def run_http(url: str, model: str, args, chunk: int | None, repeat: int, max_cache_len: int) -> dict:
    """One run against the app at `url` (idle, deployed with this setting); its row."""
    import httpx

    from bench.load import Sample, stream_completion

    before = replica_totals(url, "prefill_chunks", "compilations_since_warmup")
    short, long_prompt = decoder_prompts(args, GPT2_VOCAB_SIZE)
    limits = httpx.Limits(max_connections=args.decoders + 1, max_keepalive_connections=args.decoders + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        samples = [Sample(0.0) for _ in short]
        decoding = [asyncio.create_task(stream_completion(client, model, prompt, args.new_tokens, t0, sample))
                    for prompt, sample in zip(short, samples)]
        while not all(s.tokens >= LEAD_TOKENS or s.error for s in samples):
            await asyncio.sleep(0.002)
        log(f"{name(chunk)}, repeat {repeat + 1}/{args.repeats}: {args.decoders} decoding; "
            f"sending the {args.long_prompt}-token prompt")
        long = await stream_completion(client, model, long_prompt, 1, t0)
        await asyncio.gather(*decoding)
    failed = [s.error for s in (*samples, long) if s.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0]}")
    after = replica_totals(url, "prefill_chunks", "compilations_since_warmup")
    figures = measure([s.times for s in samples], long.sent, long.first, args.new_tokens)
    return row_of(args, "http", chunk, repeat, figures, after["prefill_chunks"] - before["prefill_chunks"],
                  after["compilations_since_warmup"] - before["compilations_since_warmup"], max_cache_len)


def main_http(args) -> int:
    max_cache_len, n_positions = served_context(args.checkpoint, args.max_cache_len)
    error = shape_error(args, max_cache_len, n_positions)
    if error:
        log(f"error: {error}")
        return 2
    with LocalApp(log, join=args.join, name=HTTP_APP) as app:
        for chunk in (None, *args.chunk):
            served = app_args(args, max_cache_len, chunk)
            app.deploy(served)
            for repeat in range(args.repeats):
                try:
                    row = asyncio.run(run_http(app.url, served.model_name, args, chunk, repeat, max_cache_len))
                    print_row(row, args.json)
                except TooFewTokens as e:
                    log(f"error: {e}")
                    return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return main_http(args) if args.backend == "http" else main_engine(args)


if __name__ == "__main__":
    sys.exit(main())
