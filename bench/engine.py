"""Engine benchmark: our JAX engine against transformers' PyTorch GPTJForCausalLM.generate,
same weights, same device, same run.

    python -m bench.engine --checkpoint PATH_OR_PRESET --batch-sizes 1,8,32 --prompt-len 128 \\
        --new-tokens 64 [--max-cache-len L] [--page-size P] [--dtype float32|bfloat16] [--quantize int8] \\
        [--kv-cache-dtype int8] [--compare-hf] [--mesh N] [--repeats R] [--json]

One row for each (system, batch), printed as it is measured: with --json one JSON object per line
(what scripts read: bench/gpu.sh, bench.roofline, bench.plot_engine), else a line of a table:
    {"system": "engine"|"hf", "batch": B, "prompt_len": P, "new_tokens": N,
     "out_tok_s": ..., "ms_per_step": ..., "prefill_ms": ...}
engine rows also carry "dtype", "quantize", "kv_cache_dtype", "max_cache_len" and "page_size"; hf
always runs unquantized weights (with --quantize it runs the float weights, and the engine the same
checkpoint loaded with `quantize="int8"`, as the server's replica loads it).
Rows are timed after warm-up (best of --repeats runs). out_tok_s = B*N / (wall time of the whole generation,
prefill included); prefill_ms is the prompt pass alone; ms_per_step = (total - prefill) / (N - 1).
The engine runs through its driver (the same loop a server runs: host sync, per-token bookkeeping,
detokenisation), greedy, exactly N tokens per prompt. The hf system runs `generate` greedy with
min_new_tokens = max_new_tokens = N on the identical weights (exported from our layout).
Progress goes to stderr; results to stdout.

The engine is the paged one (model.engine.paged): `--max-cache-len` is the context a sequence may
reach (its block table's length; default prompt + new tokens), `--page-size` the tokens per KV page.
Its decode reads only the pages the sequences hold, so two runs that differ only in --max-cache-len
(2048 against prompt + new tokens) measure what a long possible context costs when no request uses it.
The pool holds the pages the run needs (batch x cdiv(prompt + new tokens, page size), at least one
--max-cache-len sequence), not what the device has free as a server's would: a step's cost does not
depend on the pool's size, and the run then fits beside transformers' copy of the weights
(--compare-hf), which JAX's memory accounting does not see.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.harness import logger
from model.nn.config import GPT2_VOCAB_SIZE

log = logger("bench.engine")
# The table's columns (without --json): every key a row can have, in this order.
COLUMNS = ("system", "batch", "prompt_len", "new_tokens", "out_tok_s", "ms_per_step", "prefill_ms", "dtype",
           "quantize", "kv_cache_dtype", "max_cache_len", "page_size")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="preset (tiny, small, gptj-6b), checkpoint dir or gs:// URI")
    p.add_argument("--batch-sizes", default="1,8,32", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--max-cache-len", type=int, default=None,
                   help="the context a sequence may reach (default: prompt-len + new-tokens)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only quantization")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers on the same weights")
    p.add_argument("--mesh", type=int, default=1, choices=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=2, help="timed runs per point; the best is reported")
    p.add_argument("--json", action="store_true", help="one JSON object per row on stdout (default: a table)")
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes needs positive integers")
    if args.new_tokens < 2 or args.prompt_len < 1:
        p.error("--new-tokens must be >= 2 and --prompt-len >= 1")
    if args.page_size < 1:
        p.error("--page-size must be >= 1")
    args.max_cache_len = args.max_cache_len or args.prompt_len + args.new_tokens
    if args.max_cache_len < args.prompt_len + args.new_tokens:
        p.error(f"--max-cache-len {args.max_cache_len} is shorter than prompt-len + new-tokens "
                f"({args.prompt_len + args.new_tokens})")
    return args


def random_prompts(batch: int, prompt_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, min(vocab, GPT2_VOCAB_SIZE), (batch, prompt_len)).tolist()


def bench_engine(loaded, mesh, batch: int, prompt_len: int, new_tokens: int, repeats: int,
                 kv_cache_dtype: str = "auto", max_cache_len: int | None = None, page_size: int = 16) -> dict:
    import jax

    from model.engine.paged import EngineConfig, PagedEngine
    from model.engine.sampling import SamplingParams
    from model.serving.driver import Driver
    from model.serving.pages import PagePool, cdiv
    from model.serving.request import Request
    from model.text.tokenizer import Tokenizer

    max_cache_len = max_cache_len or prompt_len + new_tokens
    config = EngineConfig(prompt_buckets=(prompt_len,), batch_buckets=(batch,), slots=batch,
                          max_cache_len=max_cache_len, kv_cache_dtype=kv_cache_dtype, page_size=page_size,
                          num_pages=max(batch * cdiv(prompt_len + new_tokens, page_size), cdiv(max_cache_len, page_size)))
    engine = PagedEngine(loaded.weights, loaded.cfg, config, mesh)
    log(f"engine batch {batch}: warm-up")
    engine.warmup(progress=False)
    log(f"engine batch {batch}: warm-up took {engine.warmup_seconds:.1f}s")
    prompts = random_prompts(batch, prompt_len, loaded.cfg.vocab_size)

    prefill_s = []
    greedy = SamplingParams.host([0.0] * batch, [0] * batch, [1.0] * batch, [0] * batch)
    for _ in range(repeats):
        state = engine.init_decode_state()
        pool = PagePool(engine.page_layout, batch)  # pages for the prompts, as the scheduler takes them
        assert all(pool.allocate(slot, prompt_len) for slot in range(batch))
        jax.block_until_ready(state)
        start = time.perf_counter()
        prefix = engine.prefill(prompts, greedy)
        jax.block_until_ready(engine.insert(prefix, state, list(range(batch)), pool))
        prefill_s.append(time.perf_counter() - start)
    del state, prefix  # one pool on the device at a time: the driver allocates its own

    driver = Driver(engine, Tokenizer.gpt2())
    totals = []
    for r in range(repeats):
        requests = [Request(prompt_ids=p, max_tokens=new_tokens) for p in prompts]
        start = time.perf_counter()
        results = driver.generate(requests)
        totals.append(time.perf_counter() - start)
        assert all(len(x.token_ids) == new_tokens for x in results)
        log(f"engine batch {batch}: run {r + 1}/{repeats} {totals[-1]:.3f}s")
    if engine.compilations_since_warmup:
        log(f"WARNING: {engine.compilations_since_warmup} compilations after warm-up")
    return summarize("engine", batch, prompt_len, new_tokens, min(totals), min(prefill_s))


def summarize(system: str, batch: int, prompt_len: int, new_tokens: int, total_s: float, prefill_s: float) -> dict:
    return {
        "system": system, "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "out_tok_s": round(batch * new_tokens / total_s, 2),
        "ms_per_step": round(1000 * max(total_s - prefill_s, 0.0) / (new_tokens - 1), 3),
        "prefill_ms": round(1000 * prefill_s, 3),
    }


def hf_model(loaded, dtype: str):
    """transformers' GPTJForCausalLM holding exactly our weights, on the accelerator if there is one."""
    import ml_dtypes
    import numpy as np
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    from model import ckpt

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    with torch.device(device):  # initialised where it runs (fast on a GPU), then overwritten
        model = GPTJForCausalLM(GPTJConfig(**loaded.cfg.to_hf_dict())).to(torch_dtype).eval()
    def to_torch(a: np.ndarray):
        a = np.ascontiguousarray(a)
        if a.dtype == ml_dtypes.bfloat16:  # numpy has no bfloat16: move the bits, not the values
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    named = {k: np.asarray(v) for k, v in ckpt.leaf_names(loaded.weights).items()}
    model.load_state_dict({k: to_torch(v) for k, v in ckpt.native_to_hf(loaded.cfg, named).items()})
    return model, device


def bench_hf(model, device, vocab: int, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import torch

    ids = torch.tensor(random_prompts(batch, prompt_len, vocab), device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def generate():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        log(f"hf batch {batch}: warm-up")
        out = generate()
        assert out.shape[1] == prompt_len + new_tokens
        prefill_s, totals = [], []
        for r in range(repeats):
            sync()
            start = time.perf_counter()
            model(ids, attention_mask=mask, use_cache=True)
            sync()
            prefill_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            generate()
            sync()
            totals.append(time.perf_counter() - start)
            log(f"hf batch {batch}: run {r + 1}/{repeats} {totals[-1]:.3f}s")
    return summarize("hf", batch, prompt_len, new_tokens, min(totals), min(prefill_s))


class Printer:
    """Prints each row as it is measured: one JSON object per line, or one line of a table (the
    header before the first row; a key a row lacks, such as an hf row's dtype, shows as "-")."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.widths = {c: max(len(c), 9) for c in COLUMNS}
        self.header_done = False

    def __call__(self, row: dict) -> None:
        if self.as_json:
            print(json.dumps(row), flush=True)
            return
        if not self.header_done:
            print("  ".join(f"{c:>{w}}" for c, w in self.widths.items()), flush=True)
            self.header_done = True
        print("  ".join(f"{str(row.get(c, '-')):>{w}}" for c, w in self.widths.items()), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from model.nn.sharding import ensure_host_devices

    ensure_host_devices(args.mesh)
    import jax

    from model import ckpt
    from model.nn.sharding import make_mesh

    log(f"JAX {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    mesh = make_mesh(args.mesh)
    emit = Printer(args.json)
    # transformers needs the float weights; without it the engine's are quantized at load, as the replica does
    loaded = ckpt.load(args.checkpoint, mesh=mesh, dtype=args.dtype,
                       quantize=None if args.compare_hf else args.quantize)
    if args.max_cache_len > loaded.cfg.n_positions:
        log(f"error: --max-cache-len {args.max_cache_len} (default prompt-len + new-tokens) exceeds the model's "
            f"{loaded.cfg.n_positions} positions")
        return 2
    hf = None
    if args.compare_hf:
        hf = hf_model(loaded, args.dtype)  # from the float weights
        if args.quantize:  # the same checkpoint again, quantized by the loader (torch holds its own copy)
            del loaded
            loaded = ckpt.load(args.checkpoint, mesh=mesh, dtype=args.dtype, quantize=args.quantize)
    for batch in args.batch_sizes:
        row = bench_engine(loaded, mesh, batch, args.prompt_len, args.new_tokens, args.repeats, args.kv_cache_dtype,
                           args.max_cache_len, args.page_size)
        row |= {"dtype": args.dtype, "quantize": args.quantize or "none", "kv_cache_dtype": args.kv_cache_dtype,
                "max_cache_len": args.max_cache_len, "page_size": args.page_size}
        emit(row)
    if hf is not None:
        del loaded  # free device memory for the torch runs
        model, device = hf
        for batch in args.batch_sizes:
            emit(bench_hf(model, device, model.config.vocab_size, batch, args.prompt_len, args.new_tokens,
                          args.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
