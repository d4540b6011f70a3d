"""Per-request penalties and biases on a batch's logits, in the same step as the sampling (vLLM's semantics).

Each row's own settings (model.engine.sampling.SamplingParams), applied in this order, as vLLM's
sampler does (logits processors first, then penalties):
  1. logit_bias: `bias_values` added to the logits of `bias_ids` (a bias of -100 bans a token in
     practice, +100 all but forces it);
  2. min_tokens: while a row has generated fewer than `min_tokens` tokens, its `suppressed` tokens
     (EOS and the request's stop token ids) get -inf, so the request cannot end before;
  3. repetition_penalty r (transformers' RepetitionPenaltyLogitsProcessor, from CTRL): the logit of
     every token seen in the prompt or the output so far is divided by r where positive and
     multiplied by r where negative (r > 1 discourages repeats);
  4. frequency_penalty f and presence_penalty p (OpenAI's definition, vLLM's scope): the logit of a
     token generated c times so far loses f * c + p * (c > 0); the prompt does not count.
Then temperature, top-k, top-p and the draw (model.engine.sampling.sample), greedy included. The
logprobs reported stay the model's own (log-softmax of the raw logits), as vLLM reports by default.

What 3. and 4. need is each row's `History`: which tokens its sequence holds (`seen`, [B, V]) and
how often each occurs among its generated tokens (`counts`, [B, V]). A prefill builds it from the
whole sequence (`history_of`: the prompt, and for a request recomputed after preemption the tokens
it had generated, the last `steps` of it), `insert` puts it in the slot, and every decode step adds
the token it sampled (`add`). Rows are independent: one request's penalties never touch another's.

Cost. Every function is one `lax.cond` on whether any row of the batch asks for any of this
(`wanted`): a batch that does not pays a handful of comparisons over [B] settings.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from model.engine.sampling import NO_TOKEN, SamplingParams


@flax.struct.dataclass
class History:
    seen: jax.Array  # [B, V] bool: the token occurs in the sequence (prompt or output)
    counts: jax.Array  # [B, V] int32: occurrences among the generated tokens


def wanted(params: SamplingParams) -> jax.Array:
    """Whether any row uses a penalty, a bias or min_tokens (a scalar bool)."""
    return jnp.any((params.presence_penalty != 0) | (params.frequency_penalty != 0)
                   | (params.repetition_penalty != 1) | (params.min_tokens > 0)
                   | jnp.any(params.bias_ids != NO_TOKEN, axis=-1))


def empty(rows: int, vocab: int) -> History:
    return History(seen=jnp.zeros((rows, vocab), bool), counts=jnp.zeros((rows, vocab), jnp.int32))


def history_of(tokens: jax.Array, lengths: jax.Array, generated: jax.Array, vocab: int,
               params: SamplingParams) -> History:
    """Rows of whole sequences tokens [B, L] (true lengths [B], the last generated[B] of them
    generated): what each holds, and how often each token was generated."""
    b, length = tokens.shape

    def build(tokens):
        at = jnp.arange(length)[None, :]
        ids = jnp.where(at < lengths[:, None], tokens, NO_TOKEN)  # [B, L]: padding dropped
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, length))
        seen = jnp.zeros((b, vocab), bool).at[rows, ids].set(True, mode="drop")
        output = jnp.where(at >= (lengths - generated)[:, None], ids, NO_TOKEN)
        counts = jnp.zeros((b, vocab), jnp.int32).at[rows, output].add(1, mode="drop")
        return History(seen=seen, counts=counts)

    return jax.lax.cond(wanted(params), build, lambda _: empty(b, vocab), tokens)


def add(history: History, tokens: jax.Array, params: SamplingParams) -> History:
    """Each row's history after it generated tokens [B]."""
    def append(history):
        rows = jnp.arange(tokens.shape[0])
        return History(seen=history.seen.at[rows, tokens].set(True), counts=history.counts.at[rows, tokens].add(1))

    return jax.lax.cond(wanted(params), append, lambda h: h, history)


def adjust(logits: jax.Array, params: SamplingParams, history: History, steps: jax.Array) -> jax.Array:
    """logits [B, V] float32 with each row's bias, min_tokens and penalties applied (module docstring);
    steps [B]: tokens each row has generated before the one being sampled."""
    def apply(logits):
        rows = jnp.arange(logits.shape[0])[:, None]
        logits = logits.at[rows, params.bias_ids].add(params.bias_values, mode="drop")
        held = jnp.where((steps < params.min_tokens)[:, None], params.suppressed, NO_TOKEN)
        logits = logits.at[rows, held].set(-jnp.inf, mode="drop")
        r = params.repetition_penalty[:, None]
        repeated = jnp.where(logits > 0, logits / r, logits * r)
        logits = jnp.where(history.seen, repeated, logits)
        counts = history.counts.astype(jnp.float32)
        return (logits - params.frequency_penalty[:, None] * counts
                - params.presence_penalty[:, None] * (counts > 0).astype(jnp.float32))

    return jax.lax.cond(wanted(params), apply, lambda x: x, logits)
