"""Prefix caching benchmark: the time to first token of requests that share a long prefix, before and
after the prefix is cached, and the cache's hit rate.

    python -m bench.prefix --checkpoint PATH_OR_PRESET --prefix-len 1024 --suffix-len 32 --requests 16 \\
        [--chunk 128] [--max-cache-len L] [--dtype float32|bfloat16] [--json]

--requests prompts of --prefix-len shared random tokens followed by --suffix-len distinct ones, each
asking for one greedy token, are sent one at a time to one paged engine with enable_prefix_caching
(and prefill_chunk_tokens --chunk, which prefix caching needs: what follows a cached prefix is
prefilled as a chunk that continues its pages). The first request finds nothing cached (cold: its
whole prompt is prefilled, chunk by chunk); each later one finds the prefix's full pages (warm: only
the rest is prefilled). The driver is stepped here, and TTFT is a request's submit to the callback
that receives its token.

Before timing, the engine is warmed up (every shape compiled), and a throw-away driver on it runs a
cold and a warm request of another prefix, so the first timed request pays no first-run costs the
others do not; the timed driver starts with an empty cache and zero counters.

One row, with --json one JSON object, else key=value:
    {"ttft_ms_cold", "ttft_ms_warm" (median of the warm requests), "ttft_ms_warm_max", "hit_rate",
     "prefix_cache_queries", "prefix_cache_hits", "compilations_after_warmup", ...the run's shape}
hit_rate is prefix_cache_hits / prefix_cache_queries from the driver's stats, both in prompt tokens
(vLLM's convention), over every request, the cold one included; a request's hits are the full pages of
its cached prefix, never the page of its last token (computed for its logits). The issue's goals:
ttft_ms_warm <= 0.3x ttft_ms_cold, hit_rate >= 0.9.

Engine: prompt buckets (--max-cache-len,) (whole prompts up to the chunk are prefilled in one call,
longer ones chunk by chunk), one slot (requests go one at a time), page size 16, a pool of two
contexts, so nothing cached is evicted: the run measures reuse, not eviction. Progress goes to stderr;
results to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.harness import logger
from bench.interference import Recorder, random_prompt, step_until

log = logger("bench.prefix")
PAGE_SIZE = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="preset (tiny, small, gptj-6b), checkpoint dir or gs:// URI")
    p.add_argument("--prefix-len", type=int, default=1024, help="tokens every prompt shares")
    p.add_argument("--suffix-len", type=int, default=32, help="distinct tokens after the prefix")
    p.add_argument("--requests", type=int, default=16, help="requests sent, one at a time (the first is cold)")
    p.add_argument("--chunk", type=int, default=128, help="prefill_chunk_tokens (a multiple of the page size)")
    p.add_argument("--max-cache-len", type=int, default=None, help="context of a sequence (default: n_positions)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
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
    return args


def engine_config(args, max_cache_len: int):
    from model.engine.paged import EngineConfig

    return EngineConfig(prompt_buckets=(max_cache_len,), batch_buckets=(1,), slots=1, max_cache_len=max_cache_len,
                        page_size=PAGE_SIZE, num_pages=2 * -(-max_cache_len // PAGE_SIZE),
                        prefill_chunk_tokens=args.chunk, enable_prefix_caching=True)


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


def shared_prefix_prompts(prefix_len: int, suffix_len: int, n: int, vocab: int, seed: int) -> list[list[int]]:
    prefix = random_prompt(prefix_len, vocab, seed)
    return [prefix + random_prompt(suffix_len, vocab, seed + 1 + i) for i in range(n)]


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from model import ckpt
    from model.engine.paged import PagedEngine
    from model.nn.sharding import make_mesh
    from model.serving.driver import Driver
    from model.text.tokenizer import Tokenizer

    log(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    mesh = make_mesh(1)
    loaded = ckpt.load(args.checkpoint, mesh=mesh, dtype=args.dtype)
    max_cache_len = args.max_cache_len or loaded.cfg.n_positions
    prompt_len = args.prefix_len + args.suffix_len
    if not prompt_len + 1 <= max_cache_len <= loaded.cfg.n_positions or args.chunk > max_cache_len:
        log(f"error: a prompt + 1 token ({prompt_len + 1}) and --chunk {args.chunk} must fit max_cache_len "
            f"{max_cache_len}, at most the model's {loaded.cfg.n_positions} positions")
        return 2
    engine = PagedEngine(loaded.weights, loaded.cfg, engine_config(args, max_cache_len), mesh)
    log("warm-up")
    engine.warmup(progress=False)
    log(f"warm-up took {engine.warmup_seconds:.1f}s")
    vocab = loaded.cfg.real_vocab_size
    seed = args.requests + 1  # the timed prompts' seeds are 0..requests
    ttfts(Driver(engine, Tokenizer.gpt2()), shared_prefix_prompts(args.prefix_len, args.suffix_len, 2, vocab, seed))
    driver = Driver(engine, Tokenizer.gpt2())
    log(f"{args.requests} requests of a shared {args.prefix_len}-token prefix + {args.suffix_len} tokens")
    cold, *warm = ttfts(driver, shared_prefix_prompts(args.prefix_len, args.suffix_len, args.requests, vocab, 0))
    queries, hits = driver.stats["prefix_cache_queries"], driver.stats["prefix_cache_hits"]
    row = {"ttft_ms_cold": round(1000 * cold, 3), "ttft_ms_warm": round(1000 * statistics.median(warm), 3),
           "ttft_ms_warm_max": round(1000 * max(warm), 3), "hit_rate": round(hits / queries, 4),
           "prefix_cache_queries": queries, "prefix_cache_hits": hits,
           "compilations_after_warmup": engine.compilations_since_warmup,
           "prefix_len": args.prefix_len, "suffix_len": args.suffix_len, "requests": args.requests,
           "chunk": args.chunk, "max_cache_len": max_cache_len, "page_size": PAGE_SIZE, "dtype": args.dtype}
    log(f"TTFT cold {row['ttft_ms_cold']} ms, warm {row['ttft_ms_warm']} ms (median), hit rate {row['hit_rate']}")
    print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
