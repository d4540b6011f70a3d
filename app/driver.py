"""The replica's engine driver, built from the app's args: `load_driver`.

No Ray here (JAX is imported inside `load_driver`): the Serve replica calls it from its `__init__`,
and benchmarks call it in-process, also on machines without Ray (bench.mlperf's engine backend on a
GPU host), so the engine they measure is the one the app serves with.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Callable

from app.args import AppArgs
from model.engine.buckets import fit_prompt_buckets

if TYPE_CHECKING:
    from model.serving.driver import Driver

logger = logging.getLogger("ray.serve")


def load_driver(args: AppArgs, on_prefill: Callable[[int, list[float]], None] | None = None) -> "Driver":
    """Load `args.checkpoint` onto `args.mesh`, build and warm up the engine: a driver ready to start.
    The first JAX import of the process happens here. (Also the engine side of bench.serve and bench.mlperf.)"""
    from model.nn.sharding import ensure_host_devices

    # Both before the first jax import: virtual CPU devices for the mesh, and XLA's CPU threads.
    ensure_host_devices(args.mesh)
    os.environ["OMP_NUM_THREADS"] = str(args.replica_threads or os.cpu_count())

    from model import ckpt
    from model.engine.paged import EngineConfig, PagedEngine
    from model.nn.sharding import make_mesh
    from model.serving.driver import Driver

    start = time.perf_counter()
    mesh = make_mesh(args.mesh)
    quantize = None if args.quantize == "none" else args.quantize
    loaded = ckpt.load(args.checkpoint, mesh=mesh, dtype=args.dtype, quantize=quantize, progress=False)
    cache_len = args.max_cache_len or loaded.cfg.n_positions
    prompt_buckets = fit_prompt_buckets(args.prompt_buckets, cache_len)
    if prompt_buckets != tuple(args.prompt_buckets):
        logger.warning(f"prompt buckets {list(args.prompt_buckets)} exceed the {cache_len}-position cache of "
                       f"{args.checkpoint}; serving with {list(prompt_buckets)}")
    config = EngineConfig(**args.engine_options(prompt_buckets, cache_len))
    engine = PagedEngine(loaded.weights, loaded.cfg, config, mesh)
    engine.warmup()
    layout = engine.page_layout
    logger.info(f"engine ready: {args.checkpoint} ({loaded.source}) on {args.mesh} device(s), "
                f"{layout.num_pages} KV pages of {layout.page_size} tokens, "
                f"warm-up {engine.warmup_seconds:.1f}s, total {time.perf_counter() - start:.1f}s")
    return Driver(engine, ckpt.tokenizer_for(args.checkpoint), on_prefill=on_prefill)
