"""Sampling: the top-k / top-p filter against a plain numpy reference, and draws that stay inside it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.engine.sampling import SamplingParams, _filter_top_k_top_p, sample


def reference_keep(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Which tokens survive top-k then top-p, computed the textbook way (one row)."""
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(logits.shape, bool)
    k = top_k if 0 < top_k < len(logits) else len(logits)
    kept = order[:k]
    probs = np.exp(logits[kept] - logits[kept].max())
    probs /= probs.sum()
    before = np.cumsum(probs) - probs  # mass of strictly better tokens
    keep[kept[(before < top_p) | (np.arange(k) == 0)]] = True
    return keep


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (1, 1.0), (2, 1.0), (5, 1.0), (0, 0.5), (0, 0.9), (3, 0.7),
                                          (0, 0.05), (10, 0.99)])
def test_filter_matches_the_numpy_reference(top_k, top_p):
    rng = np.random.default_rng(top_k * 100 + int(top_p * 100))
    logits = rng.normal(size=(4, 12)).astype(np.float32) * 3
    out = np.asarray(_filter_top_k_top_p(jnp.asarray(logits), jnp.full((4,), top_k), jnp.full((4,), top_p)))
    for row in range(4):
        np.testing.assert_array_equal(np.isfinite(out[row]), reference_keep(logits[row], top_k, top_p))
        kept = np.isfinite(out[row])
        np.testing.assert_array_equal(out[row][kept], logits[row][kept])  # survivors keep their logits


def draws(probs, top_k, top_p, n=200):
    logits = np.log(np.asarray(probs, np.float32))[None].repeat(n, 0)
    params = SamplingParams.host([1.0] * n, [top_k] * n, [top_p] * n, list(range(n)))
    tokens, _ = sample(jnp.asarray(logits), params, jnp.zeros((n,), jnp.int32), real_vocab=len(probs))
    return np.asarray(tokens)


def test_top_p_half_of_0_6_0_3_0_1_always_draws_the_first():
    assert set(draws([0.6, 0.3, 0.1], 0, 0.5).tolist()) == {0}


def test_top_k_two_never_draws_the_third_but_draws_both_others():
    assert set(draws([0.4, 0.35, 0.25], 2, 1.0).tolist()) == {0, 1}


def test_unfiltered_sampling_reaches_every_token():
    assert set(draws([0.4, 0.35, 0.25], 0, 1.0).tolist()) == {0, 1, 2}


def test_padding_rows_of_the_vocabulary_are_never_drawn():
    tokens = draws([0.1, 0.1, 0.8], 0, 1.0)  # real_vocab = 3 here; check a wider vocabulary below
    assert tokens.max() <= 2
    logits = jnp.asarray(np.array([[0.0, 0.0, 50.0]] * 50, np.float32))  # the padding row is the likeliest
    params = SamplingParams.host([1.0] * 50, [0] * 50, [1.0] * 50, list(range(50)))
    drawn, _ = sample(logits, params, jnp.zeros((50,), jnp.int32), real_vocab=2)
    assert set(np.asarray(drawn).tolist()) <= {0, 1}
    greedy, logprobs = sample(logits, SamplingParams.host([0.0] * 50, [0] * 50, [1.0] * 50, [0] * 50),
                              jnp.zeros((50,), jnp.int32), real_vocab=2)
    assert set(np.asarray(greedy).tolist()) == {0}
    np.testing.assert_allclose(np.asarray(logprobs), np.log(0.5), rtol=1e-6)
    assert jax.numpy.all(jnp.isfinite(logprobs))
