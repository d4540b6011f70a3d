"""GPT-J building blocks as pure functions.

Einsum legend (upper case, used in every contraction below and in transformer.py):
  B batch   T query length   S cache (key) length   D d_model   N heads   H head dim
  F d_ff    V vocab          C the stacked q/k/v axis (3)        R rotary dim
  K the heads flattened into one axis (N*H = D), where the attention output is contracted

GPT-J quirks handled here, each a named function:
- rotary embedding on the first `rotary_dim` dims of each head only, *interleaved* (pairs
  (0,1), (2,3), ... rotate together), not the NeoX half-split form: `apply_rotary`;
- GELU is the tanh approximation ("gelu_new"): `gelu_new`;
- attention scores and softmax in float32, masked with the dtype minimum as transformers does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model.nn import quant


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def gelu_new(x: jax.Array) -> jax.Array:
    """GPT-J's activation: GELU with the tanh approximation."""
    return jax.nn.gelu(x, approximate=True)


def rotary_sin_cos(positions: jax.Array, rotary_dim: int) -> tuple[jax.Array, jax.Array]:
    """sin and cos tables for `positions` [B, T], each [B, T, R] with every frequency repeated twice
    in place (interleaved: f0, f0, f1, f1, ...), as GPT-J's `repeat_interleave` does."""
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))  # [R/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.repeat(angles, 2, axis=-1)  # [B, T, R]
    return jnp.sin(angles), jnp.cos(angles)


def rotate_every_two(x: jax.Array) -> jax.Array:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis."""
    evens, odds = x[..., ::2], x[..., 1::2]  # [..., R/2] each
    return jnp.stack((-odds, evens), axis=-1).reshape(x.shape)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array, rotary_dim: int) -> jax.Array:
    """Rotate the first `rotary_dim` dims of every head of x [B, T, N, H]; the rest pass through."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]  # [B, T, N, R], [B, T, N, H-R]
    rot32 = rot.astype(jnp.float32)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]  # [B, T, 1, R]
    rotated = (rot32 * cos + rotate_every_two(rot32) * sin).astype(x.dtype)
    return jnp.concatenate((rotated, rest), axis=-1)


def attention(q: jax.Array, k: jax.Array | quant.QuantArray, v: jax.Array | quant.QuantArray,
              allowed: jax.Array) -> jax.Array:
    """Softmax attention. q [B, T, N, H], k and v [B, N, S, H] (arrays, or int8 QuantArrays with a
    scale per token and head [B, N, S]), allowed [B, T, S] -> [B, T, N, H] in q's dtype.

    Scores and softmax run in float32; masked entries get the float32 minimum (as transformers
    does), so a row with nothing allowed (a padding query) stays finite and is ignored later.
    int8 k/v: the per-token scales factor out of each contraction, q.(s*k) = s*(q.k) and
    sum_S p*(s*v) = sum_S (p*s)*v, so the int8 values are read as they are."""
    head_dim = q.shape[-1]
    k_values = k.values if isinstance(k, quant.QuantArray) else k
    scores = jnp.einsum("BTNH,BNSH->BNTS", q.astype(jnp.float32), k_values.astype(jnp.float32))
    if isinstance(k, quant.QuantArray):
        scores = scores * k.scale[:, :, None, :]
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    scores = jnp.where(allowed[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)  # [B, N, T, S]
    if isinstance(v, quant.QuantArray):
        probs, v = probs * v.scale[:, :, None, :], v.values
    return jnp.einsum("BNTS,BNSH->BTNH", probs.astype(q.dtype), v.astype(q.dtype))


def mlp(x: jax.Array, fc_in, fc_in_bias: jax.Array, fc_out, fc_out_bias: jax.Array) -> jax.Array:
    """fc_out(gelu_new(fc_in(x))) with biases; x [B, T, D] -> [B, T, D]."""
    h = quant.einsum("BTD,DF->BTF", x, fc_in) + fc_in_bias.astype(x.dtype)
    h = gelu_new(h)
    return quant.einsum("BTF,FD->BTD", h, fc_out) + fc_out_bias.astype(x.dtype)
