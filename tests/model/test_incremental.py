"""The KV-cache path equals the full forward pass; padding never changes a row's result."""

import jax.numpy as jnp
import numpy as np
import pytest

from model import ckpt
from model.nn import transformer
from model.nn.kv_cache import KVCache


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return ckpt.load(hf_checkpoint.path, progress=False)


def test_prefill_then_decode_steps_equal_full_forward(loaded):
    cfg, w = loaded.cfg, loaded.weights
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 20)).astype(np.int32)
    full = np.asarray(transformer.full_logits(w, cfg, tokens))
    prompt_len, cache_len = 8, 32
    cache = KVCache.zeros(cfg, 2, cache_len, jnp.float32)
    positions = np.broadcast_to(np.arange(prompt_len, dtype=np.int32), (2, prompt_len))
    hidden, cache = transformer.forward(w, cfg, tokens[:, :prompt_len], positions, np.ones((2, prompt_len), bool),
                                        cache, np.zeros(2, np.int32))
    np.testing.assert_allclose(np.asarray(transformer.logits(w, hidden)), full[:, :prompt_len], atol=1e-4)
    for pos in range(prompt_len, 20):
        step = np.full((2, 1), pos, np.int32)
        hidden, cache = transformer.forward(w, cfg, tokens[:, pos : pos + 1], step, np.ones((2, 1), bool), cache,
                                            np.full(2, pos, np.int32))
        np.testing.assert_allclose(np.asarray(transformer.logits(w, hidden))[:, 0], full[:, pos], atol=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_mixed_lengths_in_one_batch_equal_each_row_alone(loaded, side):
    cfg, w = loaded.cfg, loaded.weights
    rng = np.random.RandomState(1)
    lengths = [3, 11, 7, 16]
    rows = [rng.randint(0, cfg.vocab_size, n) for n in lengths]
    width = max(lengths)
    tokens = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, row in enumerate(rows):
        sl = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        tokens[i, sl], valid[i, sl] = row, True
    batched = np.asarray(transformer.full_logits(w, cfg, tokens, valid))
    for i, row in enumerate(rows):
        alone = np.asarray(transformer.full_logits(w, cfg, row[None]))[0]
        np.testing.assert_allclose(batched[i][valid[i]], alone, atol=1e-4)
