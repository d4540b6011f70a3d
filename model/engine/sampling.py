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

from model.serving.request import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS

MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 1e6


MAX_SUPPRESSED = MAX_STOP_TOKEN_IDS + 1  # what min_tokens holds back per request: its stop token ids and EOS
NO_TOKEN = 2**30  # pads bias_ids / suppressed: out of range, so every scatter drops it


@flax.struct.dataclass
class SamplingParams:
    temperature: jax.Array  # [B] float32; 0 means greedy
    top_k: jax.Array  # [B] int32; 0 means off
    top_p: jax.Array  # [B] float32; 1 means off
    seed: jax.Array  # [B] int32
    wants_candidates: jax.Array  # [B] bool: the row's most likely tokens are read (beam search, top logprobs)
    # Per-request adjustments of the logits before sampling (model.engine.penalties).
    presence_penalty: jax.Array  # [B] float32; 0 means off
    frequency_penalty: jax.Array  # [B] float32; 0 means off
    repetition_penalty: jax.Array  # [B] float32; 1 means off
    min_tokens: jax.Array  # [B] int32: `suppressed` cannot be sampled before this many tokens
    bias_ids: jax.Array  # [B, MAX_LOGIT_BIAS] int32 token ids (NO_TOKEN pads)
    bias_values: jax.Array  # [B, MAX_LOGIT_BIAS] float32 added to those logits
    suppressed: jax.Array  # [B, MAX_SUPPRESSED] int32: EOS and stop token ids (NO_TOKEN pads)
    score_prompt: jax.Array  # [B] bool: prefill also scores every prompt token (model.engine.prompt_scores)

    @staticmethod
    def host(temperature, top_k, top_p, seed, wants_candidates=None, *, presence_penalty=None, frequency_penalty=None,
             repetition_penalty=None, min_tokens=None, logit_bias=None, suppressed=None,
             score_prompt=None) -> "SamplingParams":
        """From Python lists (one entry per row), as numpy arrays ready to pass to jit. The keyword
        settings default to off; `logit_bias` is a list of {token id: bias} per row, `suppressed` a
        list of token-id lists per row."""
        n = len(temperature)
        fill = lambda values, default: np.full((n,), default) if values is None else values  # noqa: E731
        bias_ids = np.full((n, MAX_LOGIT_BIAS), NO_TOKEN, np.int32)
        bias_values = np.zeros((n, MAX_LOGIT_BIAS), np.float32)
        for row, bias in enumerate(logit_bias or ()):
            bias_ids[row, : len(bias)] = list(bias)
            bias_values[row, : len(bias)] = list(bias.values())
        held = np.full((n, MAX_SUPPRESSED), NO_TOKEN, np.int32)
        for row, ids in enumerate(suppressed or ()):
            held[row, : len(ids)] = list(ids)
        return SamplingParams(
            temperature=np.asarray(temperature, np.float32),
            top_k=np.asarray(top_k, np.int32),
            top_p=np.asarray(top_p, np.float32),
            seed=np.asarray(seed, np.int32),
            wants_candidates=np.zeros(len(seed), bool) if wants_candidates is None else np.asarray(wants_candidates, bool),
            presence_penalty=np.asarray(fill(presence_penalty, 0.0), np.float32),
            frequency_penalty=np.asarray(fill(frequency_penalty, 0.0), np.float32),
            repetition_penalty=np.asarray(fill(repetition_penalty, 1.0), np.float32),
            min_tokens=np.asarray(fill(min_tokens, 0), np.int32),
            bias_ids=bias_ids,
            bias_values=bias_values,
            suppressed=held,
            score_prompt=np.asarray(fill(score_prompt, False), bool),
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
