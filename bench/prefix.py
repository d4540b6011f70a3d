"""Prefix caching benchmark: the time to first token of requests that share a long prefix, before and
after the prefix is cached, and the cache's hit rate.

    python -m bench.prefix --checkpoint PATH_OR_PRESET --prefix-len 1024 --suffix-len 32 --requests 16 \\
        [--chunk 128] [--max-cache-len L] [--dtype float32|bfloat16] [--backend engine|http [--join URL]] [--json]

--requests prompts of --prefix-len shared random tokens followed by --suffix-len distinct ones, each
asking for one greedy token, are sent one at a time to one paged engine with enable_prefix_caching
(and prefill_chunk_tokens --chunk, which prefix caching needs: what follows a cached prefix is
prefilled as a chunk that continues its pages). The first request finds nothing cached (cold: its
whole prompt is prefilled, chunk by chunk); each later one finds the prefix's full pages (warm: only
the rest is prefilled).

Backends:
- engine (default): the driver in this process, stepped here; TTFT is a request's submit to the
  callback that receives its token. Before timing, the engine is warmed up (every shape compiled),
  and a throw-away driver on it runs a cold and a warm request of another prefix, so the first timed
  request pays no first-run costs the others do not; the timed driver starts with an empty cache and
  zero counters.
- http: the served app (app.builder.build_app over the same engine settings, no batch wait) on a local
  Ray cluster this process starts and stops (run it under `flock /tmp/ray-tests.lock`, with
  RAY_AUTH_MODE=disabled), or, with --join URL, deployed into the running cluster whose Serve proxy
  is at URL as the application "bench-prefix" at /bench-prefix and deleted at the end. Each request
  is a `stream: true` /v1/completions over real HTTP; TTFT is its send to the server-sent event of
  its token. The same throw-away cold and warm request go first (their pages stay in the pool, of
  no use to the timed prompts); the counters are the differences of /v1/stats' before and after.

One row, with --json one JSON object, else key=value:
    {"backend", "ttft_ms_cold", "ttft_ms_warm" (median of the warm requests), "ttft_ms_warm_max",
     "hit_rate", "prefix_cache_queries", "prefix_cache_hits", "compilations_after_warmup", ...the run's shape}
hit_rate is prefix_cache_hits / prefix_cache_queries from the driver's stats (or the replicas'
/v1/stats), both in prompt tokens (vLLM's convention), over every timed request, the cold one
included; a request's hits are the full pages of its cached prefix, never the page of its last token
(computed for its logits). The issue's goals: ttft_ms_warm <= 0.3x ttft_ms_cold, hit_rate >= 0.9.

Engine: prompt buckets (--max-cache-len,) (whole prompts up to the chunk are prefilled in one call,
longer ones chunk by chunk), one slot (requests go one at a time), page size 16, a pool of two
contexts, so nothing the timed requests cache is evicted: the run measures reuse, not eviction.
Progress goes to stderr; results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from bench.harness import (LocalApp, add_backend_args, check_backend_args, logger, print_row, replica_totals,
                           served_context)
from bench.interference import Recorder, random_prompt, step_until
from model.nn.config import GPT2_VOCAB_SIZE

log = logger("bench.prefix")
PAGE_SIZE = 16
HTTP_APP = "bench-prefix"  # the application's name (and route) with --join
COUNTERS = ("prefix_cache_queries", "prefix_cache_hits")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="preset (tiny, small, gptj-6b), checkpoint dir or gs:// URI")
    p.add_argument("--prefix-len", type=int, default=1024, help="tokens every prompt shares")
    p.add_argument("--suffix-len", type=int, default=32, help="distinct tokens after the prefix")
    p.add_argument("--requests", type=int, default=16, help="requests sent, one at a time (the first is cold)")
    p.add_argument("--chunk", type=int, default=128, help="prefill_chunk_tokens (a multiple of the page size)")
    p.add_argument("--max-cache-len", type=int, default=None, help="context of a sequence (default: n_positions)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_backend_args(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (default: key=value)")
    args = p.parse_args(argv)
    if args.requests < 2:
        p.error("--requests must be >= 2: one cold, the rest warm")
    if args.prefix_len < PAGE_SIZE:
        p.error(f"--prefix-len must be at least a page ({PAGE_SIZE} tokens), or nothing can be cached")
    if args.suffix_len < 1:
        p.error("--suffix-len must be >= 1")
    if args.chunk < PAGE_SIZE or args.chunk % PAGE_SIZE:
        p.error(f"--chunk must be a positive multiple of the page size {PAGE_SIZE}")
    check_backend_args(p, args)
    return args


def shape_error(args, max_cache_len: int, n_positions: int) -> str | None:
    """Why the run's shape cannot be measured with this context, or None."""
    prompt_len = args.prefix_len + args.suffix_len
    if not prompt_len + 1 <= max_cache_len <= n_positions or args.chunk > max_cache_len:
        return (f"a prompt + 1 token ({prompt_len + 1}) and --chunk {args.chunk} must fit max_cache_len "
                f"{max_cache_len}, at most the model's {n_positions} positions")
    return None


def app_args(args, max_cache_len: int):
    """The app's args: the engine of the module docstring (both backends build it from these), no batch wait."""
    from app.args import AppArgs

    return AppArgs(checkpoint=args.checkpoint, dtype=args.dtype, prompt_buckets=(max_cache_len,),
                   prefill_batch_buckets=(1,), slots=1, batch_max_size=1, max_cache_len=max_cache_len,
                   page_size=PAGE_SIZE, kv_pages=2 * -(-max_cache_len // PAGE_SIZE), prefill_chunk_tokens=args.chunk,
                   enable_prefix_caching=True, batch_wait_ms=0)


def shared_prefix_prompts(prefix_len: int, suffix_len: int, n: int, vocab: int, seed: int) -> list[list[int]]:
    prefix = random_prompt(prefix_len, vocab, seed)
    return [prefix + random_prompt(suffix_len, vocab, seed + 1 + i) for i in range(n)]


def timed_prompts(args, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """The throw-away cold and warm prompts (another prefix), and the timed ones."""
    seed = args.requests + 1  # the timed prompts' seeds are 0..requests
    return (shared_prefix_prompts(args.prefix_len, args.suffix_len, 2, vocab, seed),
            shared_prefix_prompts(args.prefix_len, args.suffix_len, args.requests, vocab, 0))


def row_of(args, backend: str, ttft_s: list[float], queries: int, hits: int, compilations: int,
           max_cache_len: int) -> dict:
    cold, *warm = ttft_s
    row = {"backend": backend, "ttft_ms_cold": round(1000 * cold, 3),
           "ttft_ms_warm": round(1000 * statistics.median(warm), 3), "ttft_ms_warm_max": round(1000 * max(warm), 3),
           "hit_rate": round(hits / queries, 4), "prefix_cache_queries": queries, "prefix_cache_hits": hits,
           "compilations_after_warmup": compilations,
           "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "requests": args.requests,
           "chunk": args.chunk, "max_cache_len": max_cache_len, "page_size": PAGE_SIZE, "dtype": args.dtype}
    log(f"TTFT cold {row['ttft_ms_cold']} ms, warm {row['ttft_ms_warm']} ms (median), hit rate {row['hit_rate']}")
    return row


# ---------------------------------------------------------------------------------------------
# The engine backend


def ttfts(driver, prompts: list[list[int]]) -> list[float]:
    """Send each prompt alone (the next once the last has ended); each one's TTFT in seconds."""
    from model.serving.request import Request

    rec, out = Recorder(), []
    for prompt in prompts:
        request = Request(prompt_ids=prompt, max_tokens=1)
        on_output = rec.callback(request.request_id)
        submitted = time.perf_counter()
        driver.submit(request, on_output)
        step_until(driver, lambda: request.request_id in rec.finished)
        out.append(rec.times[request.request_id][0] - submitted)
    step_until(driver, lambda: not driver.has_work())
    return out


def main_engine(args) -> int:
    import jax

    from model import ckpt
    from model.engine.paged import EngineConfig, PagedEngine
    from model.nn.sharding import make_mesh
    from model.serving.driver import Driver
    from model.text.tokenizer import Tokenizer

    log(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    mesh = make_mesh(1)
    loaded = ckpt.load(args.checkpoint, mesh=mesh, dtype=args.dtype)
    max_cache_len = args.max_cache_len or loaded.cfg.n_positions
    error = shape_error(args, max_cache_len, loaded.cfg.n_positions)
    if error:
        log(f"error: {error}")
        return 2
    config = EngineConfig(**app_args(args, max_cache_len).engine_options())
    engine = PagedEngine(loaded.weights, loaded.cfg, config, mesh)
    log("warm-up")
    engine.warmup(progress=False)
    log(f"warm-up took {engine.warmup_seconds:.1f}s")
    throw_away, prompts = timed_prompts(args, loaded.cfg.real_vocab_size)
    ttfts(Driver(engine, Tokenizer.gpt2()), throw_away)
    driver = Driver(engine, Tokenizer.gpt2())
    log(f"{args.requests} requests of a shared {args.prefix_len}-token prefix + {args.suffix_len} tokens")
    timed = ttfts(driver, prompts)
    counters = (driver.stats[c] for c in COUNTERS)
    print_row(row_of(args, "engine", timed, *counters, engine.compilations_since_warmup, max_cache_len), args.json)
    return 0


# ---------------------------------------------------------------------------------------------
# The http backend


async def http_ttfts(url: str, model: str, prompts: list[list[int]]) -> list[float]:
    """Send each prompt alone over HTTP (the next once the last has ended); each one's TTFT in seconds."""
    import httpx

    from bench.load import stream_completion

    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for prompt in prompts:
            sample = await stream_completion(client, model, prompt, 1, t0=0.0)
            if sample.error or not sample.tokens:
                raise RuntimeError(f"a request failed: {sample.error or 'no token'}")
            out.append(sample.first - sample.sent)
    return out


def main_http(args) -> int:
    max_cache_len, n_positions = served_context(args.checkpoint, args.max_cache_len)
    error = shape_error(args, max_cache_len, n_positions)
    if error:
        log(f"error: {error}")
        return 2
    served = app_args(args, max_cache_len)
    throw_away, prompts = timed_prompts(args, GPT2_VOCAB_SIZE)
    with LocalApp(log, join=args.join, name=HTTP_APP) as app:
        app.deploy(served)
        asyncio.run(http_ttfts(app.url, served.model_name, throw_away))
        before = replica_totals(app.url, *COUNTERS)
        log(f"{args.requests} requests of a shared {args.prefix_len}-token prefix + {args.suffix_len} tokens")
        timed = asyncio.run(http_ttfts(app.url, served.model_name, prompts))
        after = replica_totals(app.url, *COUNTERS, "compilations_since_warmup")
    counters = (after[c] - before[c] for c in COUNTERS)
    print_row(row_of(args, "http", timed, *counters, after["compilations_since_warmup"], max_cache_len), args.json)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return main_http(args) if args.backend == "http" else main_engine(args)


if __name__ == "__main__":
    sys.exit(main())
