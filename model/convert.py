"""Convert a Hugging Face GPT-J checkpoint into the native JAX-layout checkpoint.

    python -m model.convert SRC DST [--dtype bfloat16] [--quantize int8 [--quantize-lm-head]]

SRC: a Hugging Face GPT-J directory (local or gs://...). DST: a local directory (upload it to GCS
with `gcloud storage cp -r DST gs://...`). The native checkpoint stores every leaf in the layout
the JAX model uses (fused qkv [D, 3, N, H], out [N, H, D], matrices as [in, out]), so loading it
onto a mesh reads each device's slice straight from a memory map. With --quantize int8, the
qkv / out / fc_in / fc_out matrices (and lm_head with --quantize-lm-head) are stored as int8 values
plus float32 per-output-channel scales, and load as int8. Every source key is checked:
missing, leftover or misshapen tensors stop the conversion with their names.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="Hugging Face GPT-J checkpoint directory or URI")
    parser.add_argument("dst", help="output directory for the native checkpoint")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the weight matrices (default bfloat16)")
    parser.add_argument("--quantize", choices=["int8"], default=None,
                        help="int8 weight-only post-training quantization (per output channel)")
    parser.add_argument("--quantize-lm-head", action="store_true", help="with --quantize: lm_head too")
    args = parser.parse_args(argv)
    if args.quantize_lm_head and not args.quantize:
        parser.error("--quantize-lm-head needs --quantize int8")

    import jax.numpy as jnp
    from tqdm import tqdm

    from model.ckpt import hf, native, storage
    from model.ckpt.errors import CheckpointError
    from model.ckpt.loading import quantization_targets, quantize_leaves
    from model.nn.transformer import Weights

    try:
        src = storage.resolve(args.src)
        if storage.checkpoint_format(src) != "hf":
            raise CheckpointError(f"{args.src} is already a native checkpoint")
        cfg = hf.read_hf_config(src)
        store = hf.open_hf_tensors(src)
        hf.check_hf_tensors(cfg, store, args.src)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.dst, native.NATIVE_MANIFEST)):
        print(f"error: {args.dst} already holds a native checkpoint; remove it first", file=sys.stderr)
        return 2

    specs = native.leaf_names(
        Weights.param_specs(cfg, jnp.dtype(args.dtype), args.quantize is not None, args.quantize_lm_head))
    total_bytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs.values())
    print(f"converting {args.src} -> {args.dst}: {cfg.num_params():,} parameters, {total_bytes / 1e9:.2f} GB "
          f"({args.dtype}{', int8 weights' if args.quantize else ''})", file=sys.stderr)
    start = time.perf_counter()
    targets = quantization_targets(cfg, args.quantize_lm_head) if args.quantize else {}
    converted = quantize_leaves(hf.iter_hf_as_native(cfg, store), targets)
    leaves = tqdm(((name, array.astype(specs[name].dtype)) for name, array in converted), total=len(specs),
                  desc="convert", unit="tensor", file=sys.stderr, mininterval=1.0)
    native.write_native(args.dst, cfg, leaves, specs, args.quantize, args.quantize_lm_head)
    print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
