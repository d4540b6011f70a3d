"""Convert a Hugging Face GPT-J checkpoint into the native JAX-layout checkpoint.

    python -m model.convert SRC DST [--dtype bfloat16]

SRC: a Hugging Face GPT-J directory (local or gs://...). DST: a local directory (upload it to GCS
with `gcloud storage cp -r DST gs://...`). The native checkpoint stores every leaf in the layout
the JAX model uses (fused qkv [D, 3, N, H], out [N, H, D], matrices as [in, out]), so loading it
onto a mesh reads each device's slice straight from a memory map. Every source key is checked:
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
    args = parser.parse_args(argv)

    import jax.numpy as jnp
    from tqdm import tqdm

    from model import checkpoint
    from model.transformer import Weights

    try:
        src = checkpoint.resolve(args.src)
        if checkpoint.kind(src) != "hf":
            raise checkpoint.CheckpointError(f"{args.src} is already a native checkpoint")
        cfg = checkpoint.read_hf_config(src)
        store = checkpoint.open_hf_tensors(src)
        checkpoint.check_hf_tensors(cfg, store, args.src)
    except (checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.dst, checkpoint.NATIVE_MANIFEST)):
        print(f"error: {args.dst} already holds a native checkpoint; remove it first", file=sys.stderr)
        return 2

    specs = checkpoint.leaf_names(Weights.param_specs(cfg, jnp.dtype(args.dtype)))
    total_bytes = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in specs.values())
    print(f"converting {args.src} -> {args.dst}: {cfg.num_params():,} parameters, {total_bytes / 1e9:.2f} GB "
          f"({args.dtype})", file=sys.stderr)
    start = time.perf_counter()
    leaves = tqdm(checkpoint.iter_hf_as_native(cfg, store, specs), total=len(specs), desc="convert",
                  unit="tensor", file=sys.stderr, mininterval=1.0)
    checkpoint.write_native(args.dst, cfg, leaves, specs)
    print(f"done in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
