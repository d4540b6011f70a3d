"""Lower the paged engine's step functions for TPU or CUDA on a machine that has neither.

    python -m bench.lower --platform tpu|cuda --out DIR [--checkpoint gptj-6b] [--dtype bfloat16] \\
        [--quantize int8] [--mesh 4] [--kv-cache-dtype auto|int8] [--overlay gke-tpu] \\
        [--prompt-buckets 128,512] [--prefill-batch-buckets 1,4] [--slots 32] [--max-cache-len 2048] \\
        [--page-size 64] [--kv-pages N]

Every function serving compiles (model.engine.paged.lowering_targets: prefill and insert per prompt
bucket x batch bucket, the decode step per page-count bucket) goes through `jax.export` for the
platform, on a tensor-parallel mesh of `--mesh` abstract devices (TPU v5e, or H200 for CUDA). Weights
and decode state are ShapeDtypeStructs with their shardings: nothing is allocated, no accelerator is
needed. Each function's StableHLO goes to DIR/<function>.mlir, and one JSON line per function to
stdout:
    {"platform", "function", "num_partitions", "custom_calls": [sorted distinct targets], "bytes"}

What it proves: the engine traces at the served shapes, its shardings partition over the mesh, and
the Pallas kernels pass their own lowering (Mosaic for TPU: `tpu_custom_call`; Triton for CUDA). It
exits 1, naming the function, if a decode step lacks its kernel's custom call or a module is not
partitioned `--mesh` ways. What it does not prove: Mosaic's and Triton's compilers (VMEM, shared
memory), XLA's compile, numerics or speed; those need the device. Decode attention is what
model.nn.paged_attention.choose_impl picks for the platform, KV dtype and head_dim; a fallback to the
pure-JAX path (int8 KV on TPU, a head_dim the TPU kernel cannot lower) is said on stderr.

Shapes: the `--overlay`'s application args (serve_config.yaml merged with the overlay's
serve-overrides.yaml, as kuberay renders them), mapped onto the engine's config as the replica maps
them; each flag given replaces its value. The pool: `--kv-pages`, else the args' `kv_pages`, else
the dense equivalent (slots x pages per sequence; on the device the replica sizes it from free
memory instead, which changes only the pool's page count in the modules). `--checkpoint` is a
preset name: only its shapes are used. The GKE shapes (30 functions of GPT-J 6B, 28 layers
unrolled) take 20-50 s on a 2-core CPU and write ~16 MB of text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from model.nn.sharding import TP

PLATFORMS = ("tpu", "cuda")
# Flags that replace the overlay's application args (same names).
OVERRIDES = ("dtype", "quantize", "mesh", "kv_cache_dtype", "prompt_buckets", "prefill_batch_buckets", "slots",
             "max_cache_len", "page_size", "kv_pages")
PROBLEM_EXIT = 1

_CUSTOM_CALL = re.compile(r'stablehlo\.custom_call @([^\s(]+)\(|call_target_name = "([^"]+)"')
_NUM_PARTITIONS = re.compile(r"mhlo\.num_partitions = (\d+)")


def custom_calls(mlir: str) -> list[str]:
    """The sorted distinct custom-call targets of a StableHLO module's text (pretty or generic form)."""
    return sorted({a or b for a, b in _CUSTOM_CALL.findall(mlir)})


def num_partitions(mlir: str) -> int:
    """The module's `mhlo.num_partitions` (absent on a single-device module: 1)."""
    found = _NUM_PARTITIONS.search(mlir)
    return int(found.group(1)) if found else 1


def abstract_mesh(platform: str, devices: int):
    """A 1-D `tp` mesh of abstract devices: a TPU v5e host's chips, or H200s. JAX 0.11's Triton lowering
    reads the compute capability from the abstract GPU device when the host has no GPU."""
    from jax.sharding import AbstractDevice, AbstractMesh

    device = {
        "tpu": AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu"),
        "cuda": AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu"),
    }[platform]
    return AbstractMesh((devices,), (TP,), abstract_device=device)


def export_mlir(fn, args: tuple, platform: str, mesh) -> str:
    """`fn(*args)` exported for `platform` under `mesh`, as StableHLO text. CUDA allows the Triton
    custom call, which export otherwise refuses (it has no compatibility guarantee)."""
    import jax
    from jax import export

    from model.nn.paged_attention import TRITON_CUSTOM_CALL

    disabled = [export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)] if platform == "cuda" else []
    with jax.sharding.use_abstract_mesh(mesh):
        return export.export(fn, platforms=(platform,), disabled_checks=disabled)(*args).mlir_module()


def overlay_args(overlay: str) -> dict:
    """The GPT-J application's args in the overlay's serveConfigV2, validated, defaults filled in."""
    from app.args import APP_NAME, AppArgs
    from kuberay import render

    config = render.render_serve_config(overlay)
    app = next(a for a in config["applications"] if a["name"] == APP_NAME)
    return AppArgs(**app.get("args", {})).model_dump()


def engine_config(args: dict, cfg):
    """EngineConfig from application args as the replica maps them (AppArgs.engine_options), with the
    pool made explicit: kv_pages, else the dense equivalent (no device memory to size it from). The
    args were validated as the overlay's; command-line overrides are checked by EngineConfig (the
    app-level rules, e.g. batch_max_size <= slots, do not concern lowering)."""
    from app.args import AppArgs
    from model.engine.paged import EngineConfig

    app_args = AppArgs.model_construct(**args)
    config = EngineConfig(**app_args.engine_options(cache_len=app_args.max_cache_len or cfg.n_positions))
    if config.num_pages is None:
        config = dataclasses.replace(config, num_pages=config.slots * config.pages_per_seq(cfg))
    return config


def problems(rows: list[dict], attention_impl: str, mesh_size: int) -> list[str]:
    """What the issue's contract asks of the lowered modules and they lack."""
    from model.nn.paged_attention import TPU_CUSTOM_CALL, TRITON_CUSTOM_CALL

    kernel = {"pallas_tpu": TPU_CUSTOM_CALL, "pallas_gpu": TRITON_CUSTOM_CALL}.get(attention_impl)
    found = []
    for row in rows:
        if row["num_partitions"] != mesh_size:
            found.append(f"{row['function']}: num_partitions {row['num_partitions']}, expected {mesh_size}")
        if kernel and row["function"].startswith("decode") and kernel not in row["custom_calls"]:
            found.append(f"{row['function']}: no {kernel} custom call ({attention_impl} decode attention)")
    return found


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lower", description=__doc__.split("\n\n")[0])
    p.add_argument("--platform", required=True, choices=PLATFORMS)
    p.add_argument("--out", required=True, type=Path, help="directory for <function>.mlir")
    p.add_argument("--checkpoint", default="gptj-6b", help="a preset name (shapes only)")
    p.add_argument("--overlay", default="gke-tpu", help="whose application args give the defaults below")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--quantize", choices=["none", "int8"], help="int8 weight-only quantization")
    p.add_argument("--mesh", type=int, help="devices (tensor parallel over heads)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"])
    p.add_argument("--prompt-buckets", type=_ints, help="comma-separated")
    p.add_argument("--prefill-batch-buckets", type=_ints, help="comma-separated")
    p.add_argument("--slots", type=int)
    p.add_argument("--max-cache-len", type=int)
    p.add_argument("--page-size", type=int)
    p.add_argument("--kv-pages", type=int, help="usable KV pages in the pool (default: the dense equivalent)")
    opts = p.parse_args(argv)

    import jax.numpy as jnp

    from model.engine.paged import lowering_targets
    from model.nn import paged_attention
    from model.nn.config import PRESETS

    if opts.checkpoint not in PRESETS:
        p.error(f"--checkpoint must be a preset ({sorted(PRESETS)}): only shapes are lowered")
    cfg = PRESETS[opts.checkpoint]
    args = overlay_args(opts.overlay)
    args.update({k: getattr(opts, k) for k in OVERRIDES if getattr(opts, k) is not None})
    config = engine_config(args, cfg)
    impl, fallback = paged_attention.choose_impl(opts.platform, config.kv_int8, head_dim=cfg.head_dim)
    if fallback:
        print(f"bench.lower: decode attention {impl}: {fallback}", file=sys.stderr)
    mesh = abstract_mesh(opts.platform, args["mesh"])
    targets = lowering_targets(cfg, config, mesh, dtype=jnp.dtype(args["dtype"]), quantize=args["quantize"] == "int8",
                               attention_impl=impl)

    opts.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, fn, fn_args in targets:
        mlir = export_mlir(fn, fn_args, opts.platform, mesh)
        (opts.out / f"{name}.mlir").write_text(mlir)
        row = {"platform": opts.platform, "function": name, "num_partitions": num_partitions(mlir),
               "custom_calls": custom_calls(mlir), "bytes": len(mlir.encode())}
        print(json.dumps(row), flush=True)
        rows.append(row)
    found = problems(rows, impl, args["mesh"])
    for problem in found:
        print(f"bench.lower: {problem}", file=sys.stderr)
    return PROBLEM_EXIT if found else 0


if __name__ == "__main__":
    sys.exit(main())
