"""Per-row sampling in one batch: greedy, temperature, top-k, top-p, and a per-request seed.

Every row carries its own settings (`SamplingParams`, arrays of [B]). Reproducibility: a row's
random key is `fold_in(key(seed), step)`, where step counts that request's generated tokens, so a
seeded request draws the same tokens whatever its neighbours in the batch are doing.

Log-probabilities are those of the model itself: log-softmax of the raw logits over the real
vocabulary (the first `real_vocab` entries), whatever the sampling settings. Padding rows of the
vocabulary (50257..50399 for GPT-J) are never sampled.

Extreme temperatures stay well defined: the logits are shifted so that each row's largest is 0
before scaling (no +inf from a tiny temperature), the temperature is clipped to
[MIN_TEMPERATURE, MAX_TEMPERATURE] (outside it the distribution is already one-hot or uniform to
float32 precision, and a subnormal reciprocal would turn the padding rows' -inf into NaN), and the
padding rows are masked again after scaling.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6


@flax.struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [B] float32; 0 means greedy
    top_k: jax.Array  # [B] int32; 0 means off
    top_p: jax.Array  # [B] float32; 1 means off
    seed: jax.Array  # [B] int32
    wants_candidates: jax.Array  # [B] bool: the row's most likely tokens are read (beam search, top logprobs)

    @staticmethod
    def host(temperature, top_k, top_p, seed, wants_candidates=None) -> "SamplingParams":
        """From Python lists (one entry per row), as numpy arrays ready to pass to jit."""
        return SamplingParams(
            temperature=np.asarray(temperature, np.float32),
            top_k=np.asarray(top_k, np.int32),
            top_p=np.asarray(top_p, np.float32),
            seed=np.asarray(seed, np.int32),
            wants_candidates=np.zeros(len(seed), bool) if wants_candidates is None else np.asarray(wants_candidates, bool),
        )


def chosen_logprobs(logits: jax.Array, tokens: jax.Array, real_vocab: int) -> jax.Array:
    """log p(tokens) under log-softmax of logits [B, V] restricted to the real vocabulary."""
    real = logits[:, :real_vocab].astype(jnp.float32)
    chosen = jnp.take_along_axis(real, tokens[:, None], axis=-1)[:, 0]
    return chosen - jax.nn.logsumexp(real, axis=-1)


def top_candidates(logits: jax.Array, params: SamplingParams, real_vocab: int, k: int) -> tuple[jax.Array, jax.Array]:
    """Each row's k most likely tokens under the model's own distribution (log-softmax of logits
    [B, V] over the real vocabulary), best first: (tokens [B, k] int32, logprobs [B, k] float32).
    Beam search extends its beams from these, and top logprobs are reported from them. Computed
    only when some row `wants_candidates` (else tokens 0, logprobs -inf): rows that do not ask
    pay nothing for the top-k."""

    def best(logits):
        real = logits[:, :real_vocab].astype(jnp.float32)
        top, tokens = jax.lax.top_k(real, k)
        return tokens.astype(jnp.int32), top - jax.nn.logsumexp(real, axis=-1, keepdims=True)

    def nothing(logits):
        rows = logits.shape[0]
        return jnp.zeros((rows, k), jnp.int32), jnp.full((rows, k), -jnp.inf, jnp.float32)

    return jax.lax.cond(jnp.any(params.wants_candidates), best, nothing, logits)


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Mask (to -inf) everything outside each row's top-k and nucleus (top-p) set."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)  # [B]
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [B, 1]
    sorted_desc = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]: probability of strictly better tokens
    keep_sorted = mass_before < top_p[:, None]  # always keeps the best token
    n_keep = jnp.maximum(keep_sorted.sum(-1), 1)
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
    threshold = jnp.maximum(kth, pth)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def sample(logits: jax.Array, params: SamplingParams, step: jax.Array, real_vocab: int) -> tuple[jax.Array, jax.Array]:
    """Pick one token per row. logits [B, V] float32, step [B] int32 -> (tokens [B], logprobs [B])."""
    vocab = logits.shape[-1]
    real = jnp.arange(vocab)[None, :] < real_vocab
    logits = jnp.where(real, logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled(logits):
        temperature = jnp.clip(jnp.where(params.temperature > 0, params.temperature, 1.0), MIN_TEMPERATURE,
                               MAX_TEMPERATURE)
        shifted = logits - jnp.max(logits, axis=-1, keepdims=True)  # softmax-invariant; the top entry is 0
        scaled = jnp.where(real, shifted / temperature[:, None], -jnp.inf)
        needs_filter = jnp.any(((params.top_k > 0) & (params.top_k < real_vocab)) | (params.top_p < 1.0))
        # The sort behind top-k / top-p runs only when some row asks for either.
        scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda s, k, p: s, scaled, params.top_k, params.top_p)

        def draw(seed, n, row):
            key = jax.random.fold_in(jax.random.key(seed), n)
            return jax.random.categorical(key, row)

        drawn = jax.vmap(draw)(params.seed, step, scaled).astype(jnp.int32)
        return jnp.where(params.temperature > 0, drawn, greedy)

    # Random draws over the vocabulary cost more than the argmax: skipped when every row is greedy.
    tokens = jax.lax.cond(jnp.any(params.temperature > 0), sampled, lambda _: greedy, logits)
    return tokens, chosen_logprobs(logits, tokens, real_vocab)
