"""Offline generation CLI, a thin driver over the engine.

    python -m model.generate --checkpoint PATH_OR_PRESET (--prompt TEXT | --prompt-ids 1,2,3 |
        --prompts-file F.jsonl) --max-tokens N [--temperature T] [--top-k K] [--top-p P] [--seed S]
        [--dtype float32|bfloat16] [--mesh 1|2|4] [--quantize int8] [--kv-cache-dtype int8]
        [--stop-at-eos] [--num-beams N [--length-penalty A]] [--min-tokens M] [--json]

With --json: one JSON object per prompt, one per line, in input order:
    {"prompt_ids": [...], "token_ids": [...], "logprobs": [...], "text": "..."}
`logprobs[i]` is the natural-log probability of `token_ids[i]` under the model's own distribution
(log-softmax of the raw logits over the real vocabulary), whatever the sampling settings.
With --num-beams N > 1: beam search by transformers' rules (early stopping, --length-penalty,
--min-tokens, EOS always ends a beam); `token_ids` and `text` are the best beam's (token_ids with EOS
when the beam ended on it, text without it), and the line adds "score" (transformers'
`sequences_scores`) and "beams": every finished beam, best first, as {"token_ids", "text", "score"}.
A prompts file has one JSON object per line, {"prompt": "..."} or {"prompt_ids": [...]}, each
optionally with its own "max_tokens"; all its prompts are generated as one batch.
Temperature 0 means greedy. Generation stops only at max tokens unless --stop-at-eos.
"""

from __future__ import annotations

import argparse
import json
import sys


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _read_prompts_file(path: str) -> list[dict]:
    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e})") from None
            if not isinstance(entry, dict) or ("prompt" in entry) == ("prompt_ids" in entry):
                raise ValueError(f"{path}:{n}: expected an object with exactly one of 'prompt' or 'prompt_ids'")
            entries.append(entry)
    if not entries:
        raise ValueError(f"{path}: no prompts")
    return entries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model.generate", description="Generate text with GPT-J (JAX).")
    p.add_argument("--checkpoint", required=True, help="preset name (tiny, small, gptj-6b), checkpoint dir or gs:// URI")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-ids", type=_parse_ids, help="prompt token ids, comma-separated")
    src.add_argument("--prompts-file", help="JSONL file of prompts, generated as one batch")
    p.add_argument("--max-tokens", type=int, required=True, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="weight/activation dtype (default float32, or a native checkpoint's own)")
    p.add_argument("--mesh", type=int, default=1, choices=[1, 2, 4], help="devices to shard over")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8 weight-only quantization at load (an int8 native checkpoint is int8 already)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="int8: KV cache in int8 with a scale per token and head")
    p.add_argument("--stop-at-eos", action="store_true", help="stop a prompt at <|endoftext|>")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with N beams (default 1: none)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: a finished beam scores sum(logprobs) / length ** A (default 1.0)")
    p.add_argument("--min-tokens", type=int, default=0, help="EOS cannot end a prompt before M tokens (default 0)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from model.nn.sharding import ensure_host_devices

    ensure_host_devices(args.mesh)  # before jax is imported: virtual CPU devices for --mesh N

    from model import ckpt
    from model.nn.config import ConfigError
    from model.engine.paged import PagedEngine
    from model.serving.driver import Driver
    from model.serving.request import Request, RequestRejected
    from model.nn.sharding import ShardingError, make_mesh

    try:
        if args.prompts_file:
            entries = _read_prompts_file(args.prompts_file)
        elif args.prompt is not None:
            entries = [{"prompt": args.prompt}]
        else:
            entries = [{"prompt_ids": args.prompt_ids}]
        mesh = make_mesh(args.mesh)
        loaded = ckpt.load(args.checkpoint, mesh=mesh, dtype=args.dtype, quantize=args.quantize)
        tokenizer = ckpt.tokenizer_for(args.checkpoint)
        prompts = [e["prompt_ids"] if "prompt_ids" in e else tokenizer.encode(e["prompt"]) for e in entries]
        max_tokens = [int(e.get("max_tokens", args.max_tokens)) for e in entries]
        config = cli_engine_config(loaded.cfg, prompts, max_tokens, args.kv_cache_dtype, args.num_beams)
        engine = PagedEngine(loaded.weights, loaded.cfg, config, mesh)
        requests = [
            Request(prompt_ids=p, max_tokens=n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, stop_at_eos=args.stop_at_eos, num_beams=args.num_beams,
                    length_penalty=args.length_penalty, min_tokens=args.min_tokens)
            for p, n in zip(prompts, max_tokens)
        ]
        results = Driver(engine, tokenizer).generate(requests)  # checks every request before running any
    except (OSError, ValueError, ConfigError, ShardingError, RequestRejected) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    for r in results:
        if args.json:
            line = {"prompt_ids": r.prompt_ids, "token_ids": r.token_ids, "logprobs": r.logprobs, "text": r.text}
            if r.beams is not None:
                line["score"] = r.score
                line["beams"] = [{"token_ids": b.token_ids, "text": b.text, "score": b.score} for b in r.beams]
            print(json.dumps(line, ensure_ascii=False))
        else:
            print(tokenizer.decode(r.prompt_ids) + r.text)
    return 0


def cli_engine_config(cfg, prompts: list[list[int]], max_tokens: list[int], kv_cache_dtype: str = "auto",
                      num_beams: int = 1):
    """One batch, every prompt in `num_beams` slots: a single prompt bucket (a power of two) that
    holds the longest prompt, and a cache just long enough for the longest prompt + max_tokens."""
    from model.engine.paged import EngineConfig

    longest = max(len(p) for p in prompts)
    bucket = 16
    while bucket < longest:
        bucket *= 2
    need = max(len(p) + n for p, n in zip(prompts, max_tokens))
    cache_len = min(cfg.n_positions, max(need, min(bucket, cfg.n_positions)))
    bucket = min(bucket, cache_len)
    if num_beams < 1:
        raise ValueError(f"--num-beams must be at least 1, got {num_beams}")
    return EngineConfig(prompt_buckets=(bucket,), batch_buckets=(len(prompts),), slots=len(prompts) * num_beams,
                        max_cache_len=cache_len, kv_cache_dtype=kv_cache_dtype, max_beams=num_beams)


if __name__ == "__main__":
    sys.exit(main())
