"""Interference benchmark: how long the requests already decoding stall while one long prompt is
prefilled, without and with chunked prefill, on the same weights in the same process.

    python -m bench.interference --checkpoint PATH_OR_PRESET --decoders 7 --long-prompt 1900 \\
        [--chunk 256] [--new-tokens 64] [--max-cache-len L] [--repeats 3] [--dtype float32|bfloat16] [--json]

Two paged engines over the same weights, unchunked (prefill_chunk_tokens=None) and chunked (--chunk),
both warmed up (every shape compiled) before anything is timed; then --repeats runs of each,
alternated (unchunked, chunked, unchunked, ...), each on a fresh driver, so that a machine whose speed
drifts (a shared CPU) slows both alike and the spread between repeats shows. A run: --decoders requests
with 32-token prompts and --new-tokens greedy tokens each are submitted together; once each has
received 8 tokens, one --long-prompt-token prompt (one new token) is submitted, and the driver is stepped
until every request has ended. The driver is stepped here, one `step()` at a time, and each output is
timestamped as its callback receives it, so the figures are what a streaming client would see.

One row per run, printed as it is measured (with --json one JSON object per line, else key=value):
    {"chunked": bool, "chunk": C | null, "repeat": r, "median_step_ms", "max_gap_ms", "long_ttft_ms",
     "gaps_during_prefill", "prefill_chunks", "compilations", ...the run's shape}
- median_step_ms: the median gap between two consecutive tokens of one decoding request, over the
  whole run (every decoder, every gap): the ordinary step, as a decoding client sees it;
- max_gap_ms: the longest such gap among those that overlap the long prompt's prefill (from its
  submit to its first token; `gaps_during_prefill` says how many there were): how long the prefill
  stalled the decoders;
- long_ttft_ms: the long prompt's submit to its first token;
- compilations: XLA compilations in this process during the run (0: every shape came from warm-up).
The issue's goals are for chunked rows: max_gap_ms <= 3x median_step_ms, and long_ttft_ms <= 1.3x the
unchunked rows'. The run fails (exit 1) if a decoder ended before the long prompt's first token:
--new-tokens was too few to measure the whole prefill.

Engine: prompt buckets (32, --max-cache-len) (the long prompt's validation needs a bucket that holds
it; with chunking whole prompts are prefilled only up to the chunk, longer ones chunk by chunk), batch
buckets (1, decoders + 1), slots decoders + 1, page size 16, the pool the dense equivalent (every slot
can hold a whole context: no preemption); the two engines' pools are on the device together. Progress goes to stderr; results to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.engine import random_prompts
from bench.harness import logger

log = logger("bench.interference")
PAGE_SIZE = 16
SHORT_PROMPT = 32  # tokens of each decoding request's prompt, and the prompt bucket that holds them
LEAD_TOKENS = 8  # tokens every decoder has received before the long prompt arrives


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.interference", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="preset (tiny, small, gptj-6b), checkpoint dir or gs:// URI")
    p.add_argument("--decoders", type=int, default=7, help="requests decoding when the long prompt arrives")
    p.add_argument("--long-prompt", type=int, default=1900, help="tokens of the long prompt")
    p.add_argument("--chunk", type=int, default=256, help="prefill_chunk_tokens of the chunked run")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens each decoding request generates")
    p.add_argument("--max-cache-len", type=int, default=None, help="context of a sequence (default: n_positions)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each engine, alternated")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", action="store_true", help="one JSON object per run on stdout (default: key=value)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.decoders < 1:
        p.error("--decoders must be >= 1")
    if args.new_tokens <= LEAD_TOKENS:
        p.error(f"--new-tokens must be more than the {LEAD_TOKENS} tokens decoded before the long prompt arrives")
    if args.chunk < PAGE_SIZE or args.chunk % PAGE_SIZE:
        p.error(f"--chunk must be a positive multiple of the page size {PAGE_SIZE}")
    if args.long_prompt <= args.chunk:
        p.error(f"--long-prompt {args.long_prompt} must be longer than --chunk {args.chunk}, or nothing is chunked")
    return args


def random_prompt(length: int, vocab: int, seed: int) -> list[int]:
    return random_prompts(1, length, vocab, seed)[0]


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
    gaps = [nxt - prev for times in decoder_times for prev, nxt in zip(times, times[1:])]
    during = [nxt - prev for times in decoder_times for prev, nxt in zip(times, times[1:])
              if nxt > submitted and prev < first]
    return {"median_step_ms": round(1000 * statistics.median(gaps), 3), "max_gap_ms": round(1000 * max(during), 3),
            "long_ttft_ms": round(1000 * (first - submitted), 3), "gaps_during_prefill": len(during)}


def engine_config(args, max_cache_len: int, chunk: int | None):
    from model.engine.paged import EngineConfig

    slots = args.decoders + 1
    return EngineConfig(prompt_buckets=(SHORT_PROMPT, max_cache_len), batch_buckets=(1, slots), slots=slots,
                        max_cache_len=max_cache_len, page_size=PAGE_SIZE,
                        num_pages=slots * -(-max_cache_len // PAGE_SIZE), prefill_chunk_tokens=chunk)


def make_engine(loaded, mesh, args, max_cache_len: int, chunk: int | None):
    """A paged engine over `loaded`'s weights, every shape compiled."""
    from model.engine.paged import PagedEngine

    engine = PagedEngine(loaded.weights, loaded.cfg, engine_config(args, max_cache_len, chunk), mesh)
    log(f"{name(chunk)}: warm-up")
    engine.warmup(progress=False)
    log(f"{name(chunk)}: warm-up took {engine.warmup_seconds:.1f}s")
    return engine


def name(chunk: int | None) -> str:
    return f"chunk {chunk}" if chunk else "unchunked"


def run(engine, args, chunk: int | None, repeat: int) -> dict:
    """One run on a fresh driver (an empty pool, zero counters) over `engine`; its row."""
    from model.engine.compilations import compilation_count
    from model.serving.driver import Driver
    from model.serving.request import Request
    from model.text.tokenizer import Tokenizer

    driver = Driver(engine, Tokenizer.gpt2())
    compiled_before = compilation_count()
    vocab = engine.model_config.real_vocab_size
    rec = Recorder()
    decoders = [Request(prompt_ids=random_prompt(SHORT_PROMPT, vocab, seed=i), max_tokens=args.new_tokens)
                for i in range(args.decoders)]
    driver.submit_many([(r, rec.callback(r.request_id)) for r in decoders])
    step_until(driver, lambda: all(len(rec.times[r.request_id]) >= LEAD_TOKENS for r in decoders))
    long = Request(prompt_ids=random_prompt(args.long_prompt, vocab, seed=args.decoders), max_tokens=1)
    on_long = rec.callback(long.request_id)
    log(f"{name(chunk)}, repeat {repeat + 1}/{args.repeats}: {args.decoders} decoding; "
        f"submitting the {args.long_prompt}-token prompt")
    submitted = time.perf_counter()
    driver.submit(long, on_long)
    step_until(driver, lambda: rec.times[long.request_id])
    first = rec.times[long.request_id][0]
    step_until(driver, lambda: not driver.has_work())
    row = {"chunked": chunk is not None, "chunk": chunk, "repeat": repeat,
           **measure([rec.times[r.request_id] for r in decoders], submitted, first, args.new_tokens),
           "prefill_chunks": driver.stats["prefill_chunks"],
           "compilations": compilation_count() - compiled_before,
           "decoders": args.decoders, "long_prompt": args.long_prompt, "new_tokens": args.new_tokens,
           "max_cache_len": engine.cache_len, "page_size": PAGE_SIZE, "dtype": args.dtype}
    log(f"{name(chunk)}: median step {row['median_step_ms']} ms, max gap {row['max_gap_ms']} ms, "
        f"long TTFT {row['long_ttft_ms']} ms")
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from model import ckpt
    from model.nn.sharding import make_mesh

    log(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    mesh = make_mesh(1)
    loaded = ckpt.load(args.checkpoint, mesh=mesh, dtype=args.dtype)
    max_cache_len = args.max_cache_len or loaded.cfg.n_positions
    if not SHORT_PROMPT < max_cache_len <= loaded.cfg.n_positions:
        log(f"error: --max-cache-len {max_cache_len} must exceed {SHORT_PROMPT} and be at most the model's "
            f"{loaded.cfg.n_positions} positions")
        return 2
    if args.long_prompt + 1 > max_cache_len or SHORT_PROMPT + args.new_tokens > max_cache_len:
        log(f"error: the long prompt + 1 token ({args.long_prompt + 1}) and a decoder's {SHORT_PROMPT} + "
            f"--new-tokens ({SHORT_PROMPT + args.new_tokens}) must fit max_cache_len {max_cache_len}")
        return 2
    if args.chunk > max_cache_len:
        log(f"error: --chunk {args.chunk} exceeds max_cache_len {max_cache_len}")
        return 2
    engines = {chunk: make_engine(loaded, mesh, args, max_cache_len, chunk) for chunk in (None, args.chunk)}
    for repeat in range(args.repeats):
        for chunk, engine in engines.items():
            try:
                row = run(engine, args, chunk, repeat)
            except TooFewTokens as e:
                log(f"error: {e}")
                return 1
            print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
