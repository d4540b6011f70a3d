"""Memory plan: GPT-J bytes per device on a mesh, and how many sequences of a length mix fit in the
KV cache, reserved densely (before paging) and in pages (after).

    python -m bench.memory [--checkpoint gptj-6b] [--mesh 4] [--hbm-gib 16] [--reserve-gib 1.5] \\
        [--page-size 64] [--mix full|mlperf|chat ...] [--json]

Computed from the sharded parameter and KV-cache shapes (nothing is allocated), for three setups:
bf16 weights + bf16 KV, int8 weights + bf16 KV, int8 weights + int8 KV. The KV budget per device is
its HBM less the weights' shard and `--reserve-gib` for activations and XLA workspace (a 2048-token
bf16 prefill of GPT-J needs well under 1 GiB of live activations per chip). Defaults: one TPU v5e
2x2 host (4 chips, 16 GiB HBM each); the page pool's heads are split over the mesh like the
weights', so a page of P tokens costs P x (KV bytes per token) / mesh on every device.

For each setup and length mix, one row:
    before_seqs       the dense cache: every sequence reserves n_positions (2048) positions, whatever
                      it holds, so this is the same for every mix (the figure before paging).
    pages_per_device  usable pages of --page-size tokens in the budget (page 0, the zero page unused
                      block-table entries point at, is not counted).
    after_seqs        the paged cache: a sequence of L tokens holds cdiv(L, page_size) pages, so the
                      concurrent sequences are pages_per_device // (mean pages per sequence of the mix).
Mixes (L is the length a sequence reaches at its end, when it holds the most pages):
    full    every sequence at n_positions tokens: paging gains nothing but the trash page costs little.
    mlperf  MLPerf GPT-J's CNN/DailyMail prompts (a deterministic sample, `mlperf_prompt_lengths`:
            mean about 865 tokens, capped at 1919) plus the 128 new tokens the benchmark allows.
    chat    300-token conversations.
Concurrency is also capped by the decode batch (the engine's slots) the server is configured with;
this plan is the memory side only.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

# Prompt lengths (template + article, GPT-2 BPE tokens) of the first 100 CNN/DailyMail validation
# samples in MLPerf's `cnn_eval.json` format, sorted; measured in ../shared/notes/mlperf-gptj.md, section 6.
MEASURED_PROMPT_TOKENS = (
    164, 174, 177, 218, 222, 233, 236, 237, 245, 250, 266, 274, 311, 311, 314, 334, 377, 391, 392, 398, 402, 421,
    439, 443, 444, 446, 448, 450, 459, 463, 471, 486, 492, 505, 514, 516, 537, 540, 542, 549, 553, 565, 569, 597,
    618, 627, 629, 639, 647, 667, 693, 699, 699, 699, 699, 727, 738, 740, 767, 779, 793, 823, 867, 896, 904, 910,
    962, 966, 981, 996, 997, 998, 999, 1005, 1012, 1022, 1029, 1039, 1055, 1070, 1102, 1104, 1105, 1176, 1176, 1180,
    1195, 1199, 1216, 1260, 1301, 1356, 1466, 1482, 1536, 1633, 1710, 1770, 1806, 1895,
)
TEMPLATE_TOKENS = 51  # the Alpaca-style instruction template around each article
ARTICLE_SCALE = 1.17  # the full validation split's articles are longer than the first 100 (notes, 2b)
MAX_PROMPT_TOKENS = 1919  # MLPerf truncates prompts here (1919 + 128 new < 2048)
MLPERF_NEW_TOKENS = 128  # max_new_tokens of the benchmark
MLPERF_SAMPLES = 13_368  # the QSL size
CHAT_TOKENS = 300
MIXES = ("full", "mlperf", "chat")


def mlperf_prompt_lengths(n: int = MLPERF_SAMPLES, seed: int = 0) -> np.ndarray:
    """n prompt lengths shaped like the full MLPerf GPT-J set, the recipe of the notes (section 6):
    resample the measured articles (prompt - template), scale by 1.17, jitter by U(0.95, 1.05), add
    the template back, cap at 1919. The same (n, seed) always gives the same lengths."""
    rng = np.random.default_rng(seed)
    articles = np.asarray(MEASURED_PROMPT_TOKENS)[rng.integers(0, len(MEASURED_PROMPT_TOKENS), n)] - TEMPLATE_TOKENS
    scaled = np.rint(articles * ARTICLE_SCALE * rng.uniform(0.95, 1.05, n)).astype(np.int64)
    return np.minimum(scaled + TEMPLATE_TOKENS, MAX_PROMPT_TOKENS)


def mix_lengths(mix: str, n_positions: int) -> np.ndarray:
    """The sequence lengths (tokens held at the end of each sequence) of a named mix."""
    if mix == "full":
        return np.asarray([n_positions])
    if mix == "mlperf":
        return mlperf_prompt_lengths() + MLPERF_NEW_TOKENS
    if mix == "chat":
        return np.asarray([CHAT_TOKENS])
    raise ValueError(f"unknown mix {mix!r}; expected one of {MIXES}")


def plan(cfg, mesh_size: int, hbm_gib: float, reserve_gib: float, page_size: int = 64,
         mixes: tuple[str, ...] = MIXES) -> list[dict]:
    """One row per (setup, mix): weight bytes, KV bytes per token, and the sequences that fit before
    (dense reservation of n_positions each) and after (pages of `page_size` tokens) paging."""
    import jax.numpy as jnp

    from model import ckpt
    from model.nn import sharding
    from model.nn.kv_cache import KVCache
    from model.nn.transformer import Weights

    mesh = sharding.make_mesh(mesh_size)
    lengths = {mix: mix_lengths(mix, cfg.n_positions) for mix in mixes}
    rows = []
    for name, quantize, kv_int8 in [("bf16", False, False), ("int8 weights", True, False),
                                    ("int8 weights + int8 KV", True, True)]:
        specs = ckpt.leaf_names(Weights.param_specs(cfg, jnp.bfloat16, quantize))
        total = per_device = 0
        for spec in specs.values():
            itemsize = jnp.dtype(spec.dtype).itemsize
            total += int(np.prod(spec.shape)) * itemsize
            per_device += int(np.prod(sharding.named_sharding(mesh, spec).shard_shape(spec.shape))) * itemsize
        kv_per_token = KVCache.bytes_per_token(cfg, jnp.bfloat16, kv_int8)
        kv_per_token_device = kv_per_token // mesh_size  # heads split over the mesh
        free = max(int(hbm_gib * 2**30 - reserve_gib * 2**30) - per_device, 0)
        pages = max(free // (page_size * kv_per_token_device) - 1, 0)  # less the zero page
        before = free // (kv_per_token_device * cfg.n_positions)
        for mix, seq_lengths in lengths.items():
            pages_per_seq = -(-seq_lengths // page_size)  # cdiv
            rows.append({
                "setup": name, "mix": mix, "mesh": mesh_size, "page_size": page_size,
                "weights_bytes": total, "weights_bytes_per_device": per_device, "kv_bytes_per_token": kv_per_token,
                "kv_bytes_per_page_per_device": page_size * kv_per_token_device,
                "mean_tokens_per_seq": round(float(seq_lengths.mean()), 1),
                "mean_pages_per_seq": round(float(pages_per_seq.mean()), 3),
                "pages_per_device": pages, "before_seqs": before,
                # pages // mean pages per sequence, in integers: pages * n // sum
                "after_seqs": pages * len(pages_per_seq) // int(pages_per_seq.sum()),
            })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="gptj-6b", help="a preset name (shapes only)")
    p.add_argument("--mesh", type=int, default=4)
    p.add_argument("--hbm-gib", type=float, default=16.0, help="HBM per device")
    p.add_argument("--reserve-gib", type=float, default=1.5, help="per device, for activations and workspace")
    p.add_argument("--page-size", type=int, default=64, help="tokens per KV page (the GKE overlay's)")
    p.add_argument("--mix", action="append", choices=MIXES, help="length mix (repeatable; default: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per (setup, mix) on stdout")
    args = p.parse_args(argv)
    if args.page_size < 1:
        p.error("--page-size must be >= 1")

    from model.nn.sharding import ensure_host_devices

    ensure_host_devices(args.mesh)
    from model.nn.config import preset

    rows = plan(preset(args.checkpoint), args.mesh, args.hbm_gib, args.reserve_gib, args.page_size,
                tuple(args.mix or MIXES))
    for r in rows:
        if args.json:
            print(json.dumps(r))
        else:
            print(f"{r['setup']:<24} {r['mix']:<7} weights {r['weights_bytes_per_device'] / 1e9:5.2f} GB/device; "
                  f"KV {r['kv_bytes_per_token']:,} B/token; {r['pages_per_device']} pages of {r['page_size']} "
                  f"per device; {r['mean_tokens_per_seq']:.0f} tokens/seq: "
                  f"{r['before_seqs']} sequences dense -> {r['after_seqs']} paged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
