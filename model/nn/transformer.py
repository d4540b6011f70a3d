"""GPT-J forward pass over an explicit KV cache, and the weights pytree.

Two entry points share the blocks and differ only in how a layer stores and reads keys and values
(the `attend` each block is given):
- `forward`: T new tokens per row over a dense cache [B, N, S, H] (model.nn.kv_cache), written at each
  row's `cache_index` and attended up to the query's own position. Prefill is `forward` on a fresh
  cache with T = the prompt bucket; `full_logits`, the reference path of the tests, is the same.
- `decode_forward`: one token per row over the paged pool (model.nn.paged_cache), written into its
  page and attended over the pages in use only (model.nn.paged_attention: a Pallas kernel on TPU and
  GPU, pure JAX elsewhere).

GPT-J's block is a *parallel* residual: one `ln_1` feeds both attention and MLP,
    h = h + attn(ln_1(h)) + mlp(ln_1(h)).
q/k/v/out have no bias; fc_in/fc_out do; lm_head has a bias and is not tied to the embedding.

Layer loop: the layers are a Python tuple, unrolled at trace time, not a `lax.scan` over stacked
weights. Measured on an H200 (DESIGN.md), a scan over stacked weights made the decode step 2.8x slower
(it copied each layer's weight slice), while the unrolled form ran near the bandwidth roofline. The
cost is compile time, linear in layers, which warm-up pays once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from model.nn import layers
from model.nn import quant
from model.nn import sharding
from model.nn.config import GPTJConfig
from model.nn.quant import QuantArray
from model.nn.kv_cache import KVCache, write_kv, write_rows
from model.nn.paged_attention import paged_attention
from model.nn.paged_cache import TRASH_PAGE, PagedKV, write_token
from model.nn.sharding import EMBED, FF, HEAD_DIM, HEADS, NEAR_ONE, NORMAL, QKV, VOCAB, ParamSpec


# Weight leaves that int8 quantization covers, with their leading (contracted) axes: the axes each
# int8 scale is taken over (`quant.quantize(w, axis=axes)`), leaving one scale per output channel.
QUANTIZABLE = {"qkv": (0,), "out": (0, 1), "fc_in": (0,), "fc_out": (0,)}
LM_HEAD_CONTRACTED = (0,)


@flax.struct.dataclass
class LayerWeights:
    ln_scale: jax.Array  # [D]
    ln_bias: jax.Array  # [D]
    qkv: jax.Array | QuantArray  # [D, C=3, N, H]   q, k, v projections fused, no bias
    out: jax.Array | QuantArray  # [N, H, D]        attention output projection, no bias
    fc_in: jax.Array | QuantArray  # [D, F]
    fc_in_bias: jax.Array  # [F]
    fc_out: jax.Array | QuantArray  # [F, D]
    fc_out_bias: jax.Array  # [D]


@flax.struct.dataclass
class Weights:
    wte: jax.Array  # [V, D]
    layers: tuple[LayerWeights, ...]
    ln_f_scale: jax.Array  # [D]
    ln_f_bias: jax.Array  # [D]
    lm_head: jax.Array | QuantArray  # [D, V]
    lm_head_bias: jax.Array  # [V]

    @staticmethod
    def param_specs(cfg: GPTJConfig, dtype, quantize: bool = False, quantize_lm_head: bool = False) -> "Weights":
        """Shapes, dtypes, logical axes and initializers of every leaf: the single declaration used
        by init, checkpoint loading and sharding. Norms and biases stay float32 (they are tiny). With
        `quantize`, the QUANTIZABLE matrices become int8 values + float32 per-channel scales,
        whose scales carry the logical axes of the weight's output dims (so they shard with it)."""
        d, n, h, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
        f32 = jnp.float32
        matrices = {
            "qkv": ParamSpec((d, 3, n, h), dtype, (EMBED, QKV, HEADS, HEAD_DIM), NORMAL),
            "out": ParamSpec((n, h, d), dtype, (HEADS, HEAD_DIM, EMBED), NORMAL),
            "fc_in": ParamSpec((d, f), dtype, (EMBED, FF), NORMAL),
            "fc_out": ParamSpec((f, d), dtype, (FF, EMBED), NORMAL),
        }
        if quantize:
            matrices = {k: sharding.quantized(spec, axis=QUANTIZABLE[k]) for k, spec in matrices.items()}
        layer = LayerWeights(
            ln_scale=ParamSpec((d,), f32, (EMBED,), NEAR_ONE),
            ln_bias=ParamSpec((d,), f32, (EMBED,), NORMAL),
            fc_in_bias=ParamSpec((f,), f32, (FF,), NORMAL),
            fc_out_bias=ParamSpec((d,), f32, (EMBED,), NORMAL),
            **matrices,
        )
        lm_head = ParamSpec((d, v), dtype, (EMBED, VOCAB), NORMAL)
        return Weights(
            wte=ParamSpec((v, d), dtype, (VOCAB, EMBED), NORMAL),
            layers=(layer,) * cfg.n_layers,
            ln_f_scale=ParamSpec((d,), f32, (EMBED,), NEAR_ONE),
            ln_f_bias=ParamSpec((d,), f32, (EMBED,), NORMAL),
            lm_head=sharding.quantized(lm_head, axis=LM_HEAD_CONTRACTED) if quantize_lm_head else lm_head,
            lm_head_bias=ParamSpec((v,), f32, (VOCAB,), NORMAL),
        )


def quantize_weights(weights: Weights, quantize_lm_head: bool = False) -> Weights:
    """int8 per-channel post-training quantization of the QUANTIZABLE matrices (and lm_head)."""
    layers_q = tuple(
        layer.replace(**{name: quant.quantize(getattr(layer, name), axis=axes) for name, axes in QUANTIZABLE.items()})
        for layer in weights.layers
    )
    out = weights.replace(layers=layers_q)
    return out.replace(lm_head=quant.quantize(out.lm_head, axis=LM_HEAD_CONTRACTED)) if quantize_lm_head else out


def init_weights(cfg: GPTJConfig, key: jax.Array, dtype=jnp.float32, shardings=None) -> Weights:
    """Random weights, each leaf drawn as its ParamSpec's `init` says (matrices, embeddings and
    biases N(0, 0.02^2), norm scales near 1): the weights behind a preset checkpoint.

    Generated on device inside jit, directly into `shardings` when given, so a 6B model never
    passes through host memory."""
    specs = Weights.param_specs(cfg, dtype)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=sharding.is_spec)

    def build(key):
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [sharding.initialize(spec, k) for k, spec in zip(keys, leaves)])

    return jax.jit(build, out_shardings=shardings)(key)


def embed(weights: Weights, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> hidden [B, T, D]."""
    return jnp.take(weights.wte, tokens, axis=0)


# attend(q, k, v) -> (attention output [B, T, N, H], the layer's updated cache): how one layer
# stores its new keys and values and reads the cache, the only part of a block that differs between
# the dense cache (prefill, `forward`) and the paged pool (decode, `decode_forward`).
Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def block(w: LayerWeights, cfg: GPTJConfig, x: jax.Array, sin: jax.Array, cos: jax.Array,
          attend: Attend) -> tuple[jax.Array, Any]:
    """One GPT-J block. x [B, T, D]; returns (x', the layer's cache as `attend` left it)."""
    h = layers.layer_norm(x, w.ln_scale, w.ln_bias, cfg.layer_norm_eps)
    qkv = quant.einsum("BTD,DCNH->BTCNH", h, w.qkv)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H] each
    q = layers.apply_rotary(q, sin, cos, cfg.rotary_dim)
    k = layers.apply_rotary(k, sin, cos, cfg.rotary_dim)
    attn, layer_cache = attend(q, k, v)  # [B, T, N, H]
    # Contract (N, H) as one flat axis: given "BTNH,NHD->BTD", XLA CPU copied a transposed out
    # weight on every decode step.
    attn_out = quant.einsum("BTK,KD->BTD", attn.reshape(*attn.shape[:2], -1), quant.merge_leading(w.out, 2))
    mlp_out = layers.mlp(h, w.fc_in, w.fc_in_bias, w.fc_out, w.fc_out_bias)
    return x + attn_out + mlp_out, layer_cache


def _layers(weights: Weights, cfg: GPTJConfig, tokens: jax.Array, positions: jax.Array,
            attends: Sequence[Attend]) -> tuple[jax.Array, list]:
    """Embed, every block (layer i through attends[i]), ln_f: hidden [B, T, D] and each layer's cache."""
    sin, cos = layers.rotary_sin_cos(positions, cfg.rotary_dim)
    x = embed(weights, tokens)
    caches = []
    for w, attend in zip(weights.layers, attends):
        x, layer_cache = block(w, cfg, x, sin, cos, attend)
        caches.append(layer_cache)
    return layers.layer_norm(x, weights.ln_f_scale, weights.ln_f_bias, cfg.layer_norm_eps), caches


@flax.struct.dataclass
class Context:
    """Keys and values computed before a `forward` call's tokens (a prefix already in the paged pool,
    gathered: model.nn.paged_cache.gather_pages): every new token attends to its valid positions."""

    k: tuple[jax.Array | QuantArray, ...]  # per layer [B, N, S_ctx, H]
    v: tuple[jax.Array | QuantArray, ...]
    valid: jax.Array  # [B, S_ctx] bool


def forward(
    weights: Weights,
    cfg: GPTJConfig,
    tokens: jax.Array,
    positions: jax.Array,
    token_valid: jax.Array,
    cache: KVCache,
    cache_index: jax.Array,
    context: Context | None = None,
) -> tuple[jax.Array, KVCache]:
    """Run T new tokens per row through the model, reading and extending `cache` (and reading
    `context`, when given: a prefix of every row that precedes the cache).

    tokens, positions, token_valid: [B, T]  (token_valid False marks padding)
    cache_index: [B]  where each row's T new entries are written in the cache
    Returns the final hidden states [B, T, D] (after ln_f) and the updated cache.
    """
    t = tokens.shape[1]
    valid = write_rows(cache.valid, token_valid, cache_index)  # [B, S]
    query_index = cache_index[:, None] + jnp.arange(t)[None, :]  # [B, T]
    key_index = jnp.arange(cache.length)  # [S]
    allowed = valid[:, None, :] & (key_index[None, None, :] <= query_index[:, :, None])  # [B, T, S]
    if context is not None:  # the context precedes every new token: all its valid positions are allowed
        allowed = jnp.concatenate([jnp.broadcast_to(context.valid[:, None, :], (*allowed.shape[:2],
                                                                                 context.valid.shape[1])), allowed], -1)

    def dense_attend(k_cache, v_cache, k_context, v_context):
        def attend(q, k, v):
            k_written = write_kv(k_cache, k.transpose(0, 2, 1, 3), cache_index)  # [B, N, S, H]
            v_written = write_kv(v_cache, v.transpose(0, 2, 1, 3), cache_index)
            keys, values = k_written, v_written
            if k_context is not None:
                keys, values = concat_seq(k_context, k_written), concat_seq(v_context, v_written)
            return layers.attention(q, keys, values, allowed), (k_written, v_written)
        return attend

    contexts = zip(context.k, context.v) if context is not None else [(None, None)] * len(cache.k)
    attends = [dense_attend(k, v, kc, vc) for (k, v), (kc, vc) in zip(zip(cache.k, cache.v), contexts)]
    x, caches = _layers(weights, cfg, tokens, positions, attends)
    return x, KVCache(k=tuple(k for k, _ in caches), v=tuple(v for _, v in caches), valid=valid)


def concat_seq(a: jax.Array | QuantArray, b: jax.Array | QuantArray) -> jax.Array | QuantArray:
    """Keys or values [B, N, S, (H)] joined along the sequence: arrays, or int8 values and scales."""
    if isinstance(a, QuantArray):
        return QuantArray(values=jnp.concatenate([a.values, b.values], 2), scale=jnp.concatenate([a.scale, b.scale], 2))
    return jnp.concatenate([a, b.astype(a.dtype)], 2)


def decode_forward(
    weights: Weights,
    cfg: GPTJConfig,
    tokens: jax.Array,
    positions: jax.Array,
    pages: PagedKV,
    block_tables: jax.Array,
    *,
    attention_impl: str,
    mesh=None,
) -> tuple[jax.Array, PagedKV]:
    """One decode step over the paged pool: row b's token tokens[b] at position positions[b] is
    written into its page (block_tables[b, positions[b] // page]) and attends over its sequence's
    positions 0..positions[b], reading only the pages in block_tables [B, n] (n: a page-count bucket
    that holds every row). A row with position < 0 holds no request: it writes to the trash page and
    attends over nothing. Returns the final hidden states [B, D] and the updated pool."""
    page = pages.page_size
    live = positions >= 0
    pos = jnp.maximum(positions, 0)
    rows = jnp.arange(tokens.shape[0])
    page_ids = jnp.where(live, block_tables[rows, jnp.minimum(pos // page, block_tables.shape[1] - 1)], TRASH_PAGE)
    offsets = jnp.where(live, pos % page, 0)
    lengths = jnp.where(live, pos + 1, 0).astype(jnp.int32)

    def paged_attend(k_pages, v_pages):
        def attend(q, k, v):  # q, k, v [B, 1, N, H]
            k_written = write_token(k_pages, k[:, 0], page_ids, offsets)
            v_written = write_token(v_pages, v[:, 0], page_ids, offsets)
            out = paged_attention(q[:, 0], k_written, v_written, lengths, block_tables, impl=attention_impl, mesh=mesh)
            return out[:, None], (k_written, v_written)
        return attend

    x, caches = _layers(weights, cfg, tokens[:, None], pos[:, None],
                        [paged_attend(k, v) for k, v in zip(pages.k, pages.v)])
    return x[:, 0], PagedKV(k=tuple(k for k, _ in caches), v=tuple(v for _, v in caches))


def logits(weights: Weights, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> float32 logits [..., V] over the full (padded) vocabulary."""
    out = quant.einsum("...D,DV->...V", hidden, weights.lm_head)
    return out.astype(jnp.float32) + weights.lm_head_bias.astype(jnp.float32)


def positions_from_mask(token_valid: jax.Array) -> jax.Array:
    """Rotary positions for a (left- or right-) padded batch: each real token's index among the
    real tokens of its row; padding gets position 0 (its output is never used)."""
    return jnp.maximum(jnp.cumsum(token_valid.astype(jnp.int32), axis=1) - 1, 0)


def activation_dtype(weights: Weights):
    """Activations (and the KV cache, unless quantized) use the embedding's dtype."""
    return weights.wte.dtype


@functools.partial(jax.jit, static_argnames="cfg")
def _full_logits(weights: Weights, tokens: jax.Array, token_valid: jax.Array, cfg: GPTJConfig) -> jax.Array:
    b, t = tokens.shape
    cache = KVCache.zeros(cfg, b, t, activation_dtype(weights))
    hidden, _ = forward(
        weights, cfg, tokens, positions_from_mask(token_valid), token_valid, cache, jnp.zeros((b,), jnp.int32)
    )
    return logits(weights, hidden)


def full_logits(weights: Weights, cfg: GPTJConfig, tokens: jax.Array, token_valid: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] for whole (optionally padded) sequences in one pass: the reference path
    that tests compare transformers and the incremental engine against."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if token_valid is None:
        token_valid = jnp.ones(tokens.shape, jnp.bool_)
    return _full_logits(weights, tokens, jnp.asarray(token_valid, jnp.bool_), cfg)
