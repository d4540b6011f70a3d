"""The paged engine: JetStream's engine API (model.engine.api) over the GPT-J forward pass, with the
KV cache in fixed-size pages, so memory and decode cost follow the tokens held.

    prefill(prompts)                      a padded batch of prompts -> Prefix (dense KV prefix + first tokens)
    insert(prefix, state, slots, pages)   write each prefix row into its slot's pages
    generate(state, pages)                one decode step for every slot -> (state, StepOutput)

Memory. Per layer a pool of pages [N, P, page, H] (model.nn.paged_cache); which pages a sequence
holds is the host's block table (model.serving.pages.PagePool, owned by the scheduler, passed in
to `insert` and `generate`). The pool's size comes from a memory budget: `num_pages` if given, else
what the devices report free after the weights are loaded, times `hbm_utilization`; on a device that
reports no memory (CPU) it is the dense equivalent, slots x cdiv(max_cache_len, page_size).
`slots` is only the decode batch: short sequences need few pages, so more of them fit than a
slots x max_cache_len reservation would allow.

Shapes, all compiled at warm-up (`warmup`), none after (`compilations_since_warmup` stays 0):
- prefill and insert: one program per (prefill bucket x batch bucket), and with chunked prefill one
  per (prefill bucket x prefix page bucket) for a single prompt continuing a prefix in the pool. A prompt is right-padded to
  the smallest prompt bucket; the prefill buckets are the prompt buckets plus, when they stop short
  of `max_cache_len` and the pool can run out, one of that length, so a preempted request can be
  recomputed from its prompt and everything it generated (model.serving.scheduler);
- decode: one program per page-count bucket (powers of two up to the pages of one sequence, or
  `page_buckets`). Each step runs every slot over the block tables cut to the smallest bucket that
  holds the longest live sequence, so a step over short sequences reads few pages.

Decode attention per backend (model.nn.paged_attention): the Pallas TPU paged-attention kernel under
shard_map over heads on TPU, the Pallas (Triton) GPU kernel on GPU, pure JAX over the pages in use
elsewhere and as the reference. int8 KV on TPU falls back to the pure-JAX path, and says so.

A slot that holds no request still computes (the batch shape is fixed): it writes to the trash page
and attends over nothing; the driver ignores its token. Each jitted function donates the decode
state and constrains its outputs to the shardings of its inputs, so the state never changes layout.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import sys
import time
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model.engine import api
from model.engine.api import PoolPrefix
from model.engine.buckets import smallest_fitting
from model.engine import penalties, prompt_scores
from model.engine.penalties import History
from model.engine.prompt_scores import PromptScores
from model.engine.sampling import (
    MAX_LOGIT_BIAS,
    MAX_SUPPRESSED,
    NO_TOKEN,
    SamplingParams,
    chosen_logprobs,
    sample,
    top_candidates,
)
from model.nn import paged_attention
from model.nn import sharding as shard_lib
from model.nn.config import GPTJConfig
from model.nn.kv_cache import KVCache
from model.nn.paged_cache import PagedKV, gather_pages, write_prompt
from model.nn.sharding import BATCH, CANDIDATES, ENTRIES, PAGES, SEQ, VOCAB, ParamSpec, is_spec
from model.nn.transformer import Context, Weights, activation_dtype, decode_forward, forward, logits
from model.serving.pages import PageLayout, PagePool, cdiv
from model.serving.request import Limits

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_BUCKETS = (128, 256, 512, 1024, 2048)
ATTENTION = ("auto",) + paged_attention.IMPLS


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    batch_buckets: tuple[int, ...] = (1, 4, 16)  # prefill batch sizes
    slots: int = 16  # the decode batch: sequences decoded per step
    max_cache_len: int | None = None  # the longest context one sequence may reach; default: the model's n_positions
    kv_cache_dtype: str = "auto"  # "auto": the activation dtype; "int8": per-token-per-head int8
    page_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # pages in the pool; None: from device memory, else the dense equivalent.
    #                               Fewer than one context's worth is allowed: longer requests are refused
    page_buckets: tuple[int, ...] | None = None  # decode page-count buckets; None: powers of two
    attention: str = "auto"  # decode attention: "auto" (by platform) or one of paged_attention.IMPLS
    hbm_utilization: float = 0.9  # fraction of device memory weights + pool may take, when sizing the pool
    prefill_chunk_tokens: int | None = None  # tokens of one prefill that continues a prefix in the pool (None: off)
    enable_prefix_caching: bool = False  # share cached full pages of prompts (needs prefill_chunk_tokens)
    max_beams: int | None = None  # the most beams one request may search with (each takes a slot); None: min(4, slots)
    max_top_logprobs: int = 5  # the most top logprobs a request may ask for per token

    @property
    def beam_limit(self) -> int:
        return self.max_beams if self.max_beams is not None else min(4, self.slots)

    @property
    def top_candidates(self) -> int:
        """The most likely tokens every prefill row and decode step reports: beam search extends k
        beams from each beam's best 2k (2k + 1, since EOS may be barred by min_tokens), and top
        logprobs come from them."""
        return max(2 * self.beam_limit + 1, self.max_top_logprobs)

    def cache_len(self, cfg: GPTJConfig) -> int:
        return self.max_cache_len or cfg.n_positions

    def pages_per_seq(self, cfg: GPTJConfig) -> int:
        return cdiv(self.cache_len(cfg), self.page_size)

    def decode_page_buckets(self, cfg: GPTJConfig) -> tuple[int, ...]:
        pps = self.pages_per_seq(cfg)
        if self.page_buckets is not None:
            return tuple(self.page_buckets)
        powers = tuple(1 << i for i in range(pps.bit_length()) if 1 << i < pps)
        return powers + (pps,)

    def prefill_buckets(self, cfg: GPTJConfig, num_pages: int) -> tuple[int, ...]:
        """What whole-prompt prefill takes. With chunked prefill: the prompt buckets below the chunk,
        and the chunk when a prompt or a recompute can reach it (a longer one is prefilled chunk by
        chunk). Without: the prompt buckets,
        plus max_cache_len when they stop short of it and a pool of `num_pages` can run out (fewer
        than every slot's longest sequence): a preempted request is recomputed from its prompt and
        what it generated, up to the whole context."""
        chunk = self.prefill_chunk_tokens
        preemptible = num_pages < self.slots * self.pages_per_seq(cfg)
        if chunk is not None:  # the chunk itself only when a prompt or a recompute can be longer
            needed = self.prompt_buckets[-1] >= chunk or preemptible
            return tuple(b for b in self.prompt_buckets if b < chunk) + ((chunk,) if needed else ())
        cache_len = self.cache_len(cfg)
        extra = (cache_len,) if preemptible and self.prompt_buckets[-1] < cache_len else ()
        return tuple(self.prompt_buckets) + extra

    def continuing_shapes(self, cfg: GPTJConfig, num_pages: int) -> list[tuple[int, int, int, int]]:
        """Every (prefill bucket t, prefix page bucket n) a prefill continuing a prefix can meet, as
        (t, n, the shortest prompt of bucket t, a prefix length of bucket n that leaves room for it);
        none without chunked prefill."""
        if self.prefill_chunk_tokens is None:
            return []
        page, buckets, shapes = self.page_size, self.prefill_buckets(cfg, num_pages), []
        page_buckets, cache_len = self.decode_page_buckets(cfg), self.cache_len(cfg)
        for i, t in enumerate(buckets):
            shortest = buckets[i - 1] + 1 if i else 1
            by_bucket = {smallest_fitting(p, page_buckets): p for p in range(1, (cache_len - shortest) // page + 1)}
            shapes += [(t, n, shortest, p * page) for n, p in sorted(by_bucket.items())]
        return shapes

    def validate(self, cfg: GPTJConfig) -> None:
        cache_len = self.cache_len(cfg)
        if cache_len > cfg.n_positions:
            raise ValueError(f"max_cache_len={cache_len} exceeds the model's n_positions={cfg.n_positions}")
        for name in ("prompt_buckets", "batch_buckets"):
            buckets = getattr(self, name)
            if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
                raise ValueError(f"{name}={buckets} must be positive, strictly increasing and non-empty")
        if self.prompt_buckets[-1] > cache_len:
            raise ValueError(f"largest prompt bucket {self.prompt_buckets[-1]} exceeds max_cache_len={cache_len}")
        if self.batch_buckets[-1] > self.slots:
            raise ValueError(f"largest batch bucket {self.batch_buckets[-1]} exceeds slots={self.slots}")
        if self.kv_cache_dtype not in ("auto", "int8"):
            raise ValueError(f"kv_cache_dtype must be 'auto' or 'int8', got {self.kv_cache_dtype!r}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be positive, got {self.page_size}")
        pps = self.pages_per_seq(cfg)
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be positive, got {self.num_pages}")
        buckets = self.decode_page_buckets(cfg)
        if list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or buckets[-1] != pps:
            raise ValueError(f"page_buckets={buckets} must be positive, strictly increasing and end at the "
                             f"{pps} pages of a {cache_len}-token sequence")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if not 0 < self.hbm_utilization <= 1:
            raise ValueError(f"hbm_utilization must be in (0, 1], got {self.hbm_utilization}")
        chunk = self.prefill_chunk_tokens
        if chunk is not None and (chunk < 1 or chunk % self.page_size or chunk > cache_len):
            raise ValueError(f"prefill_chunk_tokens={chunk} must be a positive multiple of page_size="
                             f"{self.page_size} and at most max_cache_len={cache_len}")
        if self.enable_prefix_caching and chunk is None:
            raise ValueError("enable_prefix_caching needs prefill_chunk_tokens: a request prefills what follows its "
                             "cached prefix as a chunk that continues it")
        if not 1 <= self.beam_limit <= self.slots:
            raise ValueError(f"max_beams={self.max_beams} must be in [1, slots={self.slots}]: each beam takes a slot")
        if self.max_top_logprobs < 0:
            raise ValueError(f"max_top_logprobs must be >= 0, got {self.max_top_logprobs}")
        if chunk is not None and self.batch_buckets[0] != 1:
            raise ValueError(f"chunked prefill runs one prompt at a time: batch_buckets={self.batch_buckets} "
                             "must start at 1")

    @property
    def kv_int8(self) -> bool:
        return self.kv_cache_dtype == "int8"


@flax.struct.dataclass
class Prefix:
    """The result of prefill for a batch of b prompts padded to T: a dense KV prefix, written into
    pages by `insert`."""

    cache: KVCache  # [b, T]
    tokens: jax.Array  # [b] first generated token
    logprobs: jax.Array  # [b]
    top_tokens: jax.Array  # [b, K] the most likely first tokens, best first (sampling.top_candidates)
    top_logprobs: jax.Array  # [b, K] their logprobs
    steps: jax.Array  # [b] the sampling step of `tokens` (0, or the tokens a recomputed request had)
    params: SamplingParams  # [b]
    history: History  # [b, V] each row's tokens, its first token included (model.engine.penalties)
    prompt: PromptScores  # [b, T] prompt logprobs of the rows that asked (model.engine.prompt_scores)

    @staticmethod
    def param_specs(cfg: GPTJConfig, batch: int, length: int, dtype, kv_int8: bool = False,
                    candidates: int = 1, prompt_top: int = 1) -> "Prefix":
        row = lambda dt: ParamSpec((batch,), dt, (BATCH,))  # noqa: E731
        top = lambda dt: ParamSpec((batch, candidates), dt, (BATCH, CANDIDATES))  # noqa: E731
        at = lambda dt, *more: ParamSpec((batch, length, *more), dt, (BATCH, SEQ) + (CANDIDATES,) * len(more))  # noqa: E731
        return Prefix(
            cache=KVCache.param_specs(cfg, batch, length, dtype, kv_int8),
            tokens=row(jnp.int32),
            logprobs=row(jnp.float32),
            top_tokens=top(jnp.int32),
            top_logprobs=top(jnp.float32),
            steps=row(jnp.int32),
            params=_sampling_specs(batch),
            history=_history_specs(cfg, batch),
            prompt=PromptScores(logprobs=at(jnp.float32), top_tokens=at(jnp.int32, prompt_top),
                                top_logprobs=at(jnp.float32, prompt_top)),
        )


@flax.struct.dataclass
class DecodeState:
    pages: PagedKV  # the pool; which slot holds which pages is the host's PagePool
    tokens: jax.Array  # [slots] the last generated token, fed to the next step
    steps: jax.Array  # [slots] the sampling step of the next token (the sampling key's step)
    params: SamplingParams  # [slots]
    history: History  # [slots, V] for penalties (model.engine.penalties)

    @staticmethod
    def param_specs(cfg: GPTJConfig, slots: int, total_pages: int, page_size: int, dtype,
                    kv_int8: bool = False) -> "DecodeState":
        row = lambda dt: ParamSpec((slots,), dt, (BATCH,))  # noqa: E731
        return DecodeState(
            pages=PagedKV.param_specs(cfg, total_pages, page_size, dtype, kv_int8),
            tokens=row(jnp.int32),
            steps=row(jnp.int32),
            params=_sampling_specs(slots),
            history=_history_specs(cfg, slots),
        )


@flax.struct.dataclass
class StepOutput:
    tokens: jax.Array  # [slots]
    logprobs: jax.Array  # [slots]
    top_tokens: jax.Array  # [slots, K] each slot's most likely next tokens, best first
    top_logprobs: jax.Array  # [slots, K]


def _sampling_specs(rows: int) -> SamplingParams:
    row = lambda dt: ParamSpec((rows,), dt, (BATCH,))  # noqa: E731
    wide = lambda dt, width: ParamSpec((rows, width), dt, (BATCH, ENTRIES))  # noqa: E731
    return SamplingParams(temperature=row(jnp.float32), top_k=row(jnp.int32), top_p=row(jnp.float32),
                          seed=row(jnp.int32), wants_candidates=row(jnp.bool_), presence_penalty=row(jnp.float32), frequency_penalty=row(jnp.float32),
                          repetition_penalty=row(jnp.float32), min_tokens=row(jnp.int32),
                          bias_ids=wide(jnp.int32, MAX_LOGIT_BIAS), bias_values=wide(jnp.float32, MAX_LOGIT_BIAS),
                          suppressed=wide(jnp.int32, MAX_SUPPRESSED), score_prompt=row(jnp.bool_))


def _history_specs(cfg: GPTJConfig, rows: int) -> History:
    return History(seen=ParamSpec((rows, cfg.vocab_size), jnp.bool_, (BATCH, VOCAB)),
                   counts=ParamSpec((rows, cfg.vocab_size), jnp.int32, (BATCH, VOCAB)))


def _sample(scores, params: SamplingParams, steps, history: History, real_vocab: int):
    """Sample from scores [B, V] after each row's penalties and biases; logprobs of the raw scores."""
    tokens, _ = sample(penalties.adjust(scores, params, history, steps), params, steps, real_vocab)
    return tokens, chosen_logprobs(scores, tokens, real_vocab)


def _constrain(tree, specs, mesh):
    return jax.tree.map(
        lambda x, s: jax.lax.with_sharding_constraint(x, shard_lib.named_sharding(mesh, s)),
        tree,
        specs,
        is_leaf=is_spec,
    )


def _prefill_impl(weights: Weights, tokens, lengths, steps, params: SamplingParams, next_tokens, *, cfg: GPTJConfig,
                  mesh, kv_int8: bool, candidates: int, prompt_top: int) -> Prefix:
    """Prefill whole prompts: row r's tokens are positions 0.. of its sequence (its whole history)."""
    return _prefill_rows(weights, tokens, lengths, steps, params, jnp.zeros_like(lengths), None, tokens, lengths,
                         next_tokens, cfg=cfg, mesh=mesh, kv_int8=kv_int8, candidates=candidates,
                         prompt_top=prompt_top)


def _prefill_context_impl(weights: Weights, pool: PagedKV, tables, starts, tokens, lengths, steps,
                          params: SamplingParams, sequences, sequence_lengths, next_tokens, *, cfg: GPTJConfig, mesh,
                          kv_int8: bool, candidates: int, prompt_top: int) -> Prefix:
    """Prefill that continues prefixes in the pool: row r's tokens are positions starts[r].. of the
    sequence whose pages are tables[r] [n], and attend to its first starts[r] positions there;
    sequences [b, max_cache_len] (true lengths [b]) are the whole sequences, for penalties."""
    span = tables.shape[1] * pool.page_size
    context = Context(k=tuple(gather_pages(leaf, tables) for leaf in pool.k),
                      v=tuple(gather_pages(leaf, tables) for leaf in pool.v),
                      valid=jnp.arange(span)[None, :] < starts[:, None])
    return _prefill_rows(weights, tokens, lengths, steps, params, starts, context, sequences, sequence_lengths,
                         next_tokens, cfg=cfg, mesh=mesh, kv_int8=kv_int8, candidates=candidates,
                         prompt_top=prompt_top)


def _prefill_rows(weights: Weights, tokens, lengths, steps, params: SamplingParams, starts, context: Context | None,
                  sequences, sequence_lengths, next_tokens, *, cfg: GPTJConfig, mesh, kv_int8: bool, candidates: int,
                  prompt_top: int) -> Prefix:
    """Prompt rows tokens [b, T] (true lengths [b]) at positions starts[r].., after `context` when
    given: their dense KV prefix, each row's first token sampled at its own step after its
    penalties over `sequences` (the last `steps` of each were generated), its top candidates (the
    model's own), and for rows that ask, the scores of their tokens after the first and of
    `next_tokens` [b] after the last."""
    b, t = tokens.shape
    specs = KVCache.param_specs(cfg, b, t, activation_dtype(weights), kv_int8)
    cache = _constrain(shard_lib.zeros(specs), specs, mesh)
    token_valid = jnp.arange(t)[None, :] < lengths[:, None]  # [b, T]
    positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    hidden, cache = forward(weights, cfg, tokens, positions, token_valid, cache, jnp.zeros((b,), jnp.int32), context)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]  # [b, D]
    scores = logits(weights, last)
    history = penalties.history_of(sequences, sequence_lengths, steps, cfg.vocab_size, params)
    first, logprob = _sample(scores, params, steps, history, cfg.real_vocab_size)
    top_tokens, top_logprobs = top_candidates(scores, params, cfg.real_vocab_size, candidates)
    targets = prompt_scores.targets_of(tokens, lengths, next_tokens)
    scored = prompt_scores.score(weights, hidden, targets, params.score_prompt, cfg.real_vocab_size, prompt_top)
    return Prefix(cache=cache, tokens=first, logprobs=logprob, top_tokens=top_tokens, top_logprobs=top_logprobs,
                  steps=steps, params=params, history=penalties.add(history, first, params), prompt=scored)


def _insert_impl(prefix: Prefix, state: DecodeState, slot_ids, page_ids, *, mesh, specs) -> DecodeState:
    """Write prefix rows into pages page_ids [b, cdiv(T, page)] and their settings into slots
    slot_ids [b]; slot id == slots (out of range) marks a padding row (its pages are the trash page)."""
    pages = PagedKV(
        k=tuple(write_prompt(d, x, page_ids) for d, x in zip(state.pages.k, prefix.cache.k)),
        v=tuple(write_prompt(d, x, page_ids) for d, x in zip(state.pages.v, prefix.cache.v)),
    )
    put = lambda dst, src: dst.at[slot_ids].set(src, mode="drop")  # noqa: E731
    new = DecodeState(
        pages=pages,
        tokens=put(state.tokens, prefix.tokens),
        steps=put(state.steps, prefix.steps + 1),
        params=jax.tree.map(put, state.params, prefix.params),
        history=jax.tree.map(put, state.history, prefix.history),
    )
    return _constrain(new, specs, mesh)


def _generate_impl(weights: Weights, state: DecodeState, block_tables, positions, *, cfg: GPTJConfig, mesh, specs,
                   attention_impl: str, candidates: int) -> tuple[DecodeState, StepOutput]:
    """positions [slots]: where each slot's token goes (its length so far), -1 for a free slot."""
    hidden, pages = decode_forward(weights, cfg, state.tokens, positions, state.pages, block_tables,
                                   attention_impl=attention_impl, mesh=mesh)
    scores = logits(weights, hidden)
    tokens, logprobs = _sample(scores, state.params, state.steps, state.history, cfg.real_vocab_size)
    top_tokens, top_logprobs = top_candidates(scores, state.params, cfg.real_vocab_size, candidates)
    new = DecodeState(pages=pages, tokens=tokens, steps=state.steps + 1, params=state.params,
                      history=penalties.add(state.history, tokens, state.params))
    return _constrain(new, specs, mesh), StepOutput(tokens=tokens, logprobs=logprobs, top_tokens=top_tokens,
                                                    top_logprobs=top_logprobs)


def _fork_impl(state: DecodeState, dst_slots, src_slots, tokens, src_pages, dst_pages, *, mesh,
               specs) -> DecodeState:
    """Beam search's reorder: slot dst_slots[i] takes slot src_slots[i]'s sampling settings and step
    and decodes `tokens[i]` next (dst == slots: a padding entry, dropped); then page src_pages[j] is
    copied to dst_pages[j] (a beam's own copy of its parent's last, partial page; padding copies the
    trash page onto itself). Every other slot and page is untouched, and so is every slot's penalty
    history (beam search takes no penalties: Limits.check_logits)."""
    put = lambda dst, src: dst.at[dst_slots].set(src, mode="drop")  # noqa: E731
    take = lambda a: a[src_slots]  # noqa: E731
    copy = lambda leaf: leaf.at[:, dst_pages].set(leaf[:, src_pages])  # noqa: E731  pages are axis 1 (scales too)
    new = DecodeState(
        pages=jax.tree.map(copy, state.pages),
        tokens=put(state.tokens, tokens),
        steps=put(state.steps, take(state.steps)),
        params=jax.tree.map(lambda a: put(a, take(a)), state.params),
        history=state.history,
    )
    return _constrain(new, specs, mesh)


class PagedEngine(api.Engine):
    """The engine API over a paged KV cache (see the module docstring)."""

    def __init__(self, weights: Weights, model_config: GPTJConfig, config: EngineConfig = EngineConfig(), mesh=None):
        config.validate(model_config)
        self.weights = weights
        self.model_config = model_config
        self.config = config
        self.mesh = mesh if mesh is not None else shard_lib.make_mesh(1)
        self.cache_len = config.cache_len(model_config)
        self.dtype = activation_dtype(weights)
        self.page_buckets = config.decode_page_buckets(model_config)
        self._layout = PageLayout(config.page_size, self._pool_pages(), config.pages_per_seq(model_config))
        self._prefill_buckets = config.prefill_buckets(model_config, self._layout.num_pages)
        self._limits = Limits(model_config.real_vocab_size, tuple(config.prompt_buckets), self.cache_len,
                              self._layout.capacity_tokens, config.beam_limit, config.page_size,
                              max_top_logprobs=config.max_top_logprobs)
        self.attention_impl = _attention_impl(model_config, config, self.mesh)
        self._state_specs = DecodeState.param_specs(model_config, config.slots, self._layout.num_pages + 1,
                                                    config.page_size, self.dtype, config.kv_int8)
        self._prefill, self._insert, self._generate, self._fork = _jitted(model_config, config, self.mesh,
                                                                          self._state_specs, self.attention_impl)
        self._prefill_context = _jitted_continuing(model_config, config, self.mesh)
        self.decode_steps_by_bucket: collections.Counter[int] = collections.Counter()  # after warm-up

    def _pool_pages(self) -> int:
        """Pages the pool gets: `num_pages`, else what the devices have free after the weights (times
        hbm_utilization, the same on every device since heads split evenly), else the dense equivalent."""
        cfg, config = self.model_config, self.config
        if config.num_pages is not None:
            return config.num_pages
        dense_equivalent = config.slots * config.pages_per_seq(cfg)
        stats = [d.memory_stats() for d in self.mesh.devices.flat]
        if any(not s or "bytes_limit" not in s for s in stats):
            return dense_equivalent
        free = min(s["bytes_limit"] * config.hbm_utilization - s.get("bytes_in_use", 0) for s in stats)
        per_device = PagedKV.bytes_per_page(cfg, config.page_size, self.dtype, config.kv_int8) / self.mesh.size
        pages = int(free // per_device) - 1  # the trash page
        if pages < 1:
            raise ValueError(f"device memory left after the weights ({free / 2**30:.2f} GiB per device at "
                             f"hbm_utilization={config.hbm_utilization}) holds no KV page")
        if pages < config.pages_per_seq(cfg):
            logger.warning(f"the KV pool ({pages} pages of {config.page_size}) holds less than one "
                           f"{self.cache_len}-token sequence: longer requests are refused")
        return pages

    # -- what a request may be ------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def eos_token_id(self) -> int:
        return self.model_config.eos_token_id

    @property
    def max_concurrent_decodes(self) -> int:
        return self.config.slots

    @property
    def max_prefill_batch(self) -> int:
        return self.config.batch_buckets[-1]

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        return self._prefill_buckets

    @property
    def page_layout(self) -> PageLayout:
        return self._layout

    @property
    def prefill_chunk_tokens(self) -> int | None:
        return self.config.prefill_chunk_tokens

    @property
    def prefix_caching(self) -> bool:
        return self.config.enable_prefix_caching

    @property
    def beam_limit(self) -> int:
        return self.max_beams if self.max_beams is not None else min(4, self.slots)

    @property
    def top_candidates(self) -> int:
        return self.config.top_candidates

    # -- the API --------------------------------------------------------------------------------

    def init_decode_state(self) -> DecodeState:
        return jax.device_put(shard_lib.zeros(self._state_specs), shard_lib.shardings(self.mesh, self._state_specs))

    def prefill(self, prompts: Sequence[Sequence[int]], params: SamplingParams, existing_prefix: PoolPrefix | None = None,
                steps: Sequence[int] | None = None, sequences: Sequence[Sequence[int]] | None = None) -> Prefix:
        """Prefill a batch of token-id prompts (padded here to buckets). `params` has one row per
        prompt (host arrays); padding rows get greedy settings. `steps`: each prompt's first sampling
        step (default 0; a recomputed request continues its own). With `existing_prefix`, one prompt of
        at most `prefill_chunk_tokens` continues a sequence already in the pool (chunked prefill, a
        cached prefix); `insert` it with the same start. `sequences`: each row's whole sequence when
        the prompt rows are parts of it (chunks, from `existing_prefix.start` or 0): penalties count
        all of it, and prompt scores score the token after the part."""
        n = len(prompts)
        if n == 0:
            raise ValueError("prefill needs at least one prompt")
        first_steps = np.zeros((n,), np.int32)
        first_steps[:] = steps if steps is not None else 0
        start = existing_prefix.start if existing_prefix is not None else 0
        next_tokens = np.full((n,), NO_TOKEN, np.int32)
        for row, (prompt, seq) in enumerate(zip(prompts, sequences or ())):
            if start + len(prompt) < len(seq):
                next_tokens[row] = seq[start + len(prompt)]
        if existing_prefix is not None:
            return self._prefill_continuing(prompts, params, existing_prefix, first_steps, sequences, next_tokens)
        t = self._bucket(max(len(p) for p in prompts), self._prefill_buckets, "prompt")
        b = self._bucket(n, self.config.batch_buckets, "prefill batch")
        tokens, lengths = _padded(prompts, b, t)
        return self._prefill(self.weights, tokens, lengths, np.pad(first_steps, (0, b - n)), _pad_rows(params, b),
                             np.pad(next_tokens, (0, b - n), constant_values=NO_TOKEN))

    def _prefill_continuing(self, prompts, params, prefix: PoolPrefix, steps, sequences, next_tokens) -> Prefix:
        chunk, page = self.config.prefill_chunk_tokens, self.config.page_size
        if chunk is None:
            raise NotImplementedError("continuing a prefix needs prefill_chunk_tokens (chunked prefill) set")
        if len(prompts) != 1 or len(prompts[0]) > chunk:
            raise ValueError(f"continuing a prefix takes one prompt of at most {chunk} tokens (prefill_chunk_tokens), "
                             f"got {len(prompts)} of up to {max(len(p) for p in prompts)}")
        if prefix.start < 1 or prefix.start % page or prefix.start + len(prompts[0]) > self.cache_len:
            raise ValueError(f"a prefix of {prefix.start} tokens must be a positive multiple of page_size={page}, "
                             f"and with {len(prompts[0])} more tokens fit max_cache_len={self.cache_len}")
        n = self._bucket(prefix.start // page, self.page_buckets, "prefix page count")
        tokens, lengths = _padded(prompts, 1, self._bucket(len(prompts[0]), self._prefill_buckets, "prompt"))
        tables = prefix.pages.table[[prefix.slot], :n].copy()
        whole = _padded(sequences or [[0] * prefix.start + list(prompts[0])], 1, self.cache_len)
        return self._prefill_context(self.weights, prefix.state.pages, tables, np.array([prefix.start], np.int32),
                                     tokens, lengths, steps, params, *whole, next_tokens)

    def insert(self, prefix: Prefix, state: DecodeState, slots: Sequence[int], pages: PagePool,
               start: int = 0) -> DecodeState:
        """Write prefix rows 0..len(slots)-1 into those slots' pages (taken in `pages` already), from
        position `start` of their sequences on (a prefix continued by `prefill(existing_prefix=)`);
        the rest of the padded batch, and pages past a sequence's end, go to the trash page."""
        b, t = prefix.cache.batch, prefix.cache.length
        page = self.config.page_size
        slot_ids = np.full((b,), self.config.slots, np.int32)
        slot_ids[: len(slots)] = slots
        first = start // page
        padded = np.pad(pages.table, ((0, 0), (0, cdiv(t, page))))  # pages past the table: the trash page
        page_ids = np.zeros((b, cdiv(t, page)), np.int32)
        page_ids[: len(slots)] = padded[list(slots), first : first + page_ids.shape[1]]
        return self._insert(prefix, state, slot_ids, page_ids)

    def generate(self, state: DecodeState, pages: PagePool) -> tuple[DecodeState, StepOutput]:
        """One decode step for every slot, over the block tables cut to the page bucket that holds
        the longest sequence after this step's token."""
        longest = int(pages.lengths.max()) + 1
        n = self._bucket(self._layout.pages_for(longest), self.page_buckets, "page count")
        positions = np.where(pages.lengths > 0, pages.lengths, -1).astype(np.int32)
        if self.warmup_seconds is not None:
            self.decode_steps_by_bucket[n] += 1
        return self._generate(self.weights, state, pages.table[:, :n].copy(), positions)

    def fork(self, state: DecodeState, forks: Sequence[tuple[int, int, int]],
             copies: Sequence[tuple[int, int]]) -> DecodeState:
        """Beam search: each (dst slot, src slot, token) of `forks` gives dst src's settings and step and
        feeds it `token` next; each (src page, dst page) of `copies` is copied (see `_fork_impl`)."""
        slots = self.config.slots
        if len(forks) > slots or len(copies) > slots:
            raise ValueError(f"{len(forks)} forks and {len(copies)} page copies: at most {slots} of each")
        arrays = np.zeros((5, slots), np.int32)
        arrays[0] = slots  # padding forks are dropped; padding copies copy the trash page onto itself
        if forks:
            arrays[:3, : len(forks)] = np.asarray(forks, np.int32).T
        if copies:
            arrays[3:, : len(copies)] = np.asarray(copies, np.int32).T
        return self._fork(state, *arrays)

    @staticmethod
    def _bucket(size: int, buckets: Sequence[int], what: str) -> int:
        bucket = smallest_fitting(size, buckets)
        if bucket is None:  # the driver checks requests against `limits` first: a caller's bug
            raise ValueError(f"{what} of {size} exceeds the largest bucket {buckets[-1]}")
        return bucket

    # -- warm-up ----------------------------------------------------------------------------------

    def warmup(self, progress: bool = True) -> float:
        """Compile every prefill / insert shape and the decode step of every page bucket; returns the
        seconds it took. Runs on a scratch page table, writing only the trash page."""
        start = self._warmup_started()
        state = self.init_decode_state()
        scratch = PagePool(self._layout, self.config.slots)  # nothing allocated: every write goes to the trash page
        shapes = [(t, b) for t in self._prefill_buckets for b in self.config.batch_buckets]
        for i, (t, b) in enumerate(shapes):
            if progress:
                _progress(f"prefill+insert shape {i + 1}/{len(shapes)} (prompt {t}, batch {b})", start)
            params = SamplingParams.host([0.0] * b, [0] * b, [1.0] * b, [0] * b)
            prefix = self.prefill([[0] * t] * b, params)  # length t selects bucket t
            state = self.insert(prefix, state, list(range(b)), scratch)
        continuing = self.config.continuing_shapes(self.model_config, self._layout.num_pages)
        for i, (t, n, shortest, prefix_tokens) in enumerate(continuing):
            if progress:
                _progress(f"continuing prefill {i + 1}/{len(continuing)} (prompt {t} after up to {n} pages)", start)
            params = SamplingParams.host([0.0], [0], [1.0], [0])
            prefix = self.prefill([[0] * shortest], params, PoolPrefix(state, scratch, 0, prefix_tokens))
            state = self.insert(prefix, state, [0], scratch, start=prefix_tokens)
        for i, n in enumerate(self.page_buckets):
            if progress:
                _progress(f"decode step {i + 1}/{len(self.page_buckets)} ({n} pages per sequence)", start)
            scratch.lengths[0] = (n - 1) * self.config.page_size  # selects page bucket n; its table row is trash
            state, out = self.generate(state, scratch)
        scratch.lengths[0] = 0
        if progress:
            _progress("beam fork", start)
        state = self.fork(state, [], [])
        jax.block_until_ready(out)
        seconds = self._warmed_up(start)
        if progress:
            print(f"warm-up: {len(shapes)} prefill shapes and {len(self.page_buckets)} decode steps compiled in "
                  f"{seconds:.1f}s ({self._layout.num_pages} KV pages of {self.config.page_size} tokens, "
                  f"attention: {self.attention_impl})", file=sys.stderr, flush=True)
        return seconds



def _progress(what: str, start: float) -> None:
    print(f"warm-up: {what}, {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def _attention_impl(cfg: GPTJConfig, config: EngineConfig, mesh) -> str:
    """The decode attention for this mesh's platform, logging an explicit fallback."""
    if config.attention != "auto":
        return config.attention
    platform = mesh.devices.flat[0].platform
    impl, fallback = paged_attention.choose_impl(platform, config.kv_int8, cfg.head_dim)
    if fallback:
        logger.warning(f"decode attention on {platform}: {impl} ({fallback})")
    return impl


def _jitted(cfg: GPTJConfig, config: EngineConfig, mesh, specs: DecodeState, attention_impl: str):
    """The engine's jitted functions: prefill, insert (donates the state), generate (donates it) and
    fork (beam search's reorder; donates it)."""
    candidates = config.top_candidates
    prefill = jax.jit(functools.partial(_prefill_impl, cfg=cfg, mesh=mesh, kv_int8=config.kv_int8,
                                        candidates=candidates, prompt_top=_prompt_top(config)))
    insert = jax.jit(functools.partial(_insert_impl, mesh=mesh, specs=specs), donate_argnums=(1,))
    generate = jax.jit(functools.partial(_generate_impl, cfg=cfg, mesh=mesh, specs=specs,
                                         attention_impl=attention_impl, candidates=candidates), donate_argnums=(1,))
    fork = jax.jit(functools.partial(_fork_impl, mesh=mesh, specs=specs), donate_argnums=(0,))
    return prefill, insert, generate, fork


def _jitted_continuing(cfg: GPTJConfig, config: EngineConfig, mesh):
    """The prefill that continues a prefix in the pool (reads the pool, donates nothing)."""
    return jax.jit(functools.partial(_prefill_context_impl, cfg=cfg, mesh=mesh, kv_int8=config.kv_int8,
                                     candidates=config.top_candidates, prompt_top=_prompt_top(config)))


def _prompt_top(config: EngineConfig) -> int:
    """How many most likely tokens prompt scores keep per position (lax.top_k needs at least one)."""
    return max(config.max_top_logprobs, 1)


def lowering_targets(model_config: GPTJConfig, config: EngineConfig, mesh, *, dtype, quantize: bool,
                     attention_impl: str) -> list[tuple[str, object, tuple]]:
    """Every function serving compiles, with abstract arguments (shapes, dtypes, shardings on `mesh`;
    nothing allocated): [(name, jitted function, args)] for `jax.export` (bench.lower). Needs
    `config.num_pages` (no device to measure). Names: prefill_t{T}_b{B}, insert_t{T}_b{B},
    prefill_continue_t{T}_p{n} (with chunked prefill), decode_p{n}, beam_fork."""
    if config.num_pages is None:
        raise ValueError("lowering needs an explicit num_pages: there is no device memory to size the pool from")
    config.validate(model_config)
    cfg = model_config
    cache_len = config.cache_len(cfg)
    abstract = lambda specs: jax.tree.map(  # noqa: E731
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shard_lib.named_sharding(mesh, s)), specs,
        is_leaf=is_spec)
    int32 = lambda shape, axes: abstract(ParamSpec(shape, jnp.int32, axes))  # noqa: E731
    weights = abstract(Weights.param_specs(cfg, dtype, quantize))
    specs = DecodeState.param_specs(cfg, config.slots, config.num_pages + 1, config.page_size, dtype, config.kv_int8)
    state = abstract(specs)
    prefill, insert, generate, fork = _jitted(cfg, config, mesh, specs, attention_impl)
    targets = []
    for t in config.prefill_buckets(cfg, config.num_pages):
        for b in config.batch_buckets:
            rows = abstract(Prefix.param_specs(cfg, b, t, dtype, config.kv_int8, config.top_candidates))
            args = (weights, int32((b, t), (BATCH, SEQ)), int32((b,), (BATCH,)), rows.steps, rows.params,
                    int32((b,), (BATCH,)))
            targets.append((f"prefill_t{t}_b{b}", prefill, args))
            page_ids = int32((b, cdiv(t, config.page_size)), (BATCH, PAGES))
            targets.append((f"insert_t{t}_b{b}", insert, (rows, state, int32((b,), (BATCH,)), page_ids)))
    continuing = _jitted_continuing(cfg, config, mesh)
    for t, n, _, _ in config.continuing_shapes(cfg, config.num_pages):
        row = abstract(Prefix.param_specs(cfg, 1, t, dtype, config.kv_int8, config.top_candidates))
        args = (weights, state.pages, int32((1, n), (BATCH, PAGES)), int32((1,), (BATCH,)), int32((1, t), (BATCH, SEQ)),
                int32((1,), (BATCH,)), row.steps, row.params, int32((1, cache_len), (BATCH, SEQ)),
                int32((1,), (BATCH,)), int32((1,), (BATCH,)))
        targets.append((f"prefill_continue_t{t}_p{n}", continuing, args))
    for n in config.decode_page_buckets(cfg):
        block_tables = int32((config.slots, n), (BATCH, PAGES))
        targets.append((f"decode_p{n}", generate, (weights, state, block_tables, int32((config.slots,), (BATCH,)))))
    slot_rows = [int32((config.slots,), (BATCH,))] * 5
    targets.append(("beam_fork", fork, (state, *slot_rows)))
    return targets


def _padded(prompts: Sequence[Sequence[int]], rows: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts right-padded into tokens [rows, length] with their true lengths [rows]."""
    tokens = np.zeros((rows, length), np.int32)
    lengths = np.zeros((rows,), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
        lengths[row] = len(prompt)
    return tokens, lengths


def _pad_rows(params: SamplingParams, rows: int) -> SamplingParams:
    """Pad host sampling settings to `rows` rows with greedy, unfiltered settings."""
    extra = rows - len(params.temperature)
    neutral = SamplingParams.host([0.0] * extra, [0] * extra, [1.0] * extra, [0] * extra)
    return jax.tree.map(lambda a, pad: np.concatenate([np.asarray(a), pad]), params, neutral)
