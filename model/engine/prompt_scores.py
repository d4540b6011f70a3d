"""Prompt logprobs: how likely the model found every prompt token, from the prefill that runs anyway.

OpenAI's `echo` with `logprobs` (what lm-evaluation-harness scores loglikelihoods with) and vLLM's
`prompt_logprobs` ask, for each prompt token after the first, for its log-probability given the
tokens before it, and the most likely alternatives there. The prefill has the hidden state of every
prompt position already; `score` turns each into the log-softmax over the real vocabulary of its
logits, and keeps the logprob of the token that follows (the next prompt token) and the `k` best.

Position p of a row scores the token at p + 1; its last position (lengths - 1) scores `next_tokens`
instead: the first token of the next chunk when the row is a chunk of a longer prompt (chunked
prefill), or nothing (NO_TOKEN) at the end of a prompt, where the sampled first token follows.

Cost. Rows are scored one at a time, in blocks of BLOCK positions ([BLOCK, V] logits at a time,
never [T, V] for a whole batch), and only rows whose `score_prompt` is set: the others cost one
branch of a `lax.cond` each. Same shapes for every request, so nothing compiles after warm-up.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from model.engine.sampling import NO_TOKEN
from model.nn.transformer import Weights, logits

BLOCK = 64  # prompt positions whose logits are computed at once


@flax.struct.dataclass
class PromptScores:
    logprobs: jax.Array  # [b, T] float32: position p, the logprob of the token after it
    top_tokens: jax.Array  # [b, T, k] int32: the k most likely tokens after position p, best first
    top_logprobs: jax.Array  # [b, T, k] float32


def targets_of(tokens: jax.Array, lengths: jax.Array, next_tokens: jax.Array) -> jax.Array:
    """The token each position scores: the next prompt token, `next_tokens` at the last one."""
    shifted = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)  # [b, T]
    last = jnp.arange(tokens.shape[1])[None, :] == (lengths - 1)[:, None]
    return jnp.where(last, next_tokens[:, None], shifted)


def score(weights: Weights, hidden: jax.Array, targets: jax.Array, want: jax.Array, real_vocab: int,
          k: int) -> PromptScores:
    """hidden [b, T, D] of prompt rows, targets [b, T] (`targets_of`), want [b] bool -> PromptScores
    (zeros in rows not wanted)."""
    b, t, d = hidden.shape
    blocks = -(-t // BLOCK)
    pad = blocks * BLOCK - t

    def score_row(h, target):  # h [T, D], target [T]
        h = jnp.pad(h, ((0, pad), (0, 0))).reshape(blocks, BLOCK, d)
        target = jnp.pad(target, (0, pad)).reshape(blocks, BLOCK)

        def block(args):
            hb, tb = args
            real = logits(weights, hb)[:, :real_vocab]  # [BLOCK, V]
            norm = jax.nn.logsumexp(real, axis=-1, keepdims=True)
            chosen = jnp.take_along_axis(real, jnp.clip(tb, 0, real_vocab - 1)[:, None], axis=-1) - norm
            best, ids = jax.lax.top_k(real, k)
            return jnp.where(tb < real_vocab, chosen[:, 0], 0.0), ids.astype(jnp.int32), best - norm

        chosen, ids, best = jax.lax.map(block, (h, target))  # [blocks, BLOCK, ...]
        return chosen.reshape(-1)[:t], ids.reshape(-1, k)[:t], best.reshape(-1, k)[:t]

    def skip(h, target):
        return jnp.zeros((t,), jnp.float32), jnp.zeros((t, k), jnp.int32), jnp.zeros((t, k), jnp.float32)

    def row(args):
        h, target, w = args
        return jax.lax.cond(w, score_row, skip, h, target)

    chosen, ids, best = jax.lax.map(row, (hidden, targets, want))
    return PromptScores(logprobs=chosen, top_tokens=ids, top_logprobs=best)


def no_next_token(rows: int) -> jax.Array:
    """next_tokens for whole prompts: nothing after the last position is scored."""
    return jnp.full((rows,), NO_TOKEN, jnp.int32)
