"""A driver over the mock engine (model/engine/mock.py), built from the app's args: the
`driver_factory` that tests bind into the Serve graph (app.builder.bind_app) to test serving
behaviour (cancellation, faults, streaming order, batching) without a model. Tokens are
hand-computable: a prompt ending in token t streams t+1, t+2, ... Must stay importable by Ray
workers (the test cluster puts the repository on their PYTHONPATH)."""

from __future__ import annotations

from app.args import AppArgs
from model.engine.mock import MockEngine
from model.serving.driver import Driver
from model.text.tokenizer import Tokenizer

MOCK_CONTEXT = 256  # max_total_length when the args set no max_cache_len


def mock_driver(args: AppArgs, on_prefill=None) -> Driver:
    engine = MockEngine(slots=args.slots, prompt_buckets=args.prompt_buckets,
                        max_prefill_batch=max(args.prefill_batch_buckets),
                        max_total_length=args.max_cache_len or MOCK_CONTEXT)
    engine.warmup()
    return Driver(engine, Tokenizer.gpt2(), on_prefill=on_prefill)
