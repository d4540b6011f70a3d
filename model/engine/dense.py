"""The dense engine: JetStream's engine API (model.engine.api) over the GPT-J forward pass, with a
slot-contiguous KV cache: every slot reserves `max_cache_len` positions.

    prefill(prompts)               a padded batch of prompts -> Prefix (KV prefix + first tokens)
    insert(prefix, state, slots)   copy each prefix row into a free decode slot
    generate(state)                one decode step for every slot -> (state, StepOutput)

Shapes: a prompt is right-padded to the smallest prompt bucket that holds it, a prefill batch to
the smallest batch bucket, and decode always runs all `slots` over a cache of `max_cache_len`
positions. `warmup()` compiles every (prompt bucket x batch bucket) prefill and insert and the one
decode step up front; afterwards the engine expects no more XLA compilations, and counts them
(`compilations_since_warmup`) so servers and tests can prove it.

A slot that holds no request still computes (the shape is fixed); its position is clamped to the last
cache index and its tokens are ignored by the driver. `insert` rewrites a slot's whole row, so what
a previous request left behind is never read, and a finished request holds nothing to free. Each
jitted function donates the decode state, and constrains its outputs to the same shardings as its
inputs, so state never changes layout (which would force a recompile).

Prefill always starts from an empty cache here: continuing an existing prefix (chunked prefill,
prefix caching) needs the paged cache.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from model.engine import api
from model.engine.buckets import smallest_fitting
from model.nn import sharding as shard_lib
from model.nn.config import GPTJConfig
from model.nn.kv_cache import KVCache
from model.engine.sampling import SamplingParams, sample
from model.nn.sharding import BATCH, ParamSpec, is_spec
from model.nn.transformer import Weights, activation_dtype, forward, logits
from model.serving.request import Limits

DEFAULT_PROMPT_BUCKETS = (128, 256, 512, 1024, 2048)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    prompt_buckets: tuple[int, ...] = DEFAULT_PROMPT_BUCKETS
    batch_buckets: tuple[int, ...] = (1, 4, 16)  # prefill batch sizes
    slots: int = 16  # concurrent decodes
    max_cache_len: int | None = None  # cache positions per slot; default: the model's n_positions
    kv_cache_dtype: str = "auto"  # "auto": the activation dtype; "int8": per-token-per-head int8

    def cache_len(self, cfg: GPTJConfig) -> int:
        return self.max_cache_len or cfg.n_positions

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

    @property
    def kv_int8(self) -> bool:
        return self.kv_cache_dtype == "int8"


@flax.struct.dataclass
class Prefix:
    """The result of prefill for a batch of b prompts padded to T."""

    cache: KVCache  # [b, T]
    tokens: jax.Array  # [b] first generated token
    logprobs: jax.Array  # [b]
    lengths: jax.Array  # [b] true prompt lengths
    params: SamplingParams  # [b]


@flax.struct.dataclass
class DecodeState:
    cache: KVCache  # [slots, S]
    tokens: jax.Array  # [slots] the last generated token, fed to the next step
    positions: jax.Array  # [slots] cache index (= rotary position) of `tokens`
    steps: jax.Array  # [slots] tokens generated so far (the sampling key's step)
    params: SamplingParams  # [slots]

    @staticmethod
    def param_specs(cfg: GPTJConfig, slots: int, length: int, dtype, kv_int8: bool = False) -> "DecodeState":
        row = lambda dt: ParamSpec((slots,), dt, (BATCH,))  # noqa: E731
        return DecodeState(
            cache=KVCache.param_specs(cfg, slots, length, dtype, kv_int8),
            tokens=row(jnp.int32),
            positions=row(jnp.int32),
            steps=row(jnp.int32),
            params=SamplingParams(row(jnp.float32), row(jnp.int32), row(jnp.float32), row(jnp.int32)),
        )


@flax.struct.dataclass
class StepOutput:
    tokens: jax.Array  # [slots]
    logprobs: jax.Array  # [slots]


def _constrain(tree, specs, mesh):
    return jax.tree.map(
        lambda x, s: jax.lax.with_sharding_constraint(x, shard_lib.named_sharding(mesh, s)),
        tree,
        specs,
        is_leaf=is_spec,
    )


def _prefill_impl(weights: Weights, tokens, lengths, params: SamplingParams, *, cfg: GPTJConfig, mesh,
                  kv_int8: bool) -> Prefix:
    b, t = tokens.shape
    cache = KVCache.zeros(cfg, b, t, activation_dtype(weights), kv_int8)
    cache = _constrain(cache, KVCache.param_specs(cfg, b, t, activation_dtype(weights), kv_int8), mesh)
    token_valid = jnp.arange(t)[None, :] < lengths[:, None]  # [b, T]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, cache = forward(weights, cfg, tokens, positions, token_valid, cache, jnp.zeros((b,), jnp.int32))
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]  # [b, D]
    first, logprob = sample(logits(weights, last), params, jnp.zeros((b,), jnp.int32), cfg.real_vocab_size)
    return Prefix(cache=cache, tokens=first, logprobs=logprob, lengths=lengths, params=params)


def _insert_impl(prefix: Prefix, state: DecodeState, slot_ids, *, cfg: GPTJConfig, mesh, specs) -> DecodeState:
    """Scatter prefix rows into slots; slot id == slots (out of range) marks a padding row (dropped)."""
    t = prefix.cache.length
    s = state.cache.length

    def put_kv(dst, src):  # dst [slots, N, S, (H)], src [b, N, T, (H)]: values, or int8 values and scales
        return jax.tree.map(lambda d, x: d.at[slot_ids, :, :t].set(x, mode="drop"), dst, src)

    valid_rows = jnp.pad(prefix.cache.valid, ((0, 0), (0, s - t)))  # [b, S]
    cache = KVCache(
        k=tuple(put_kv(d, x) for d, x in zip(state.cache.k, prefix.cache.k)),
        v=tuple(put_kv(d, x) for d, x in zip(state.cache.v, prefix.cache.v)),
        valid=state.cache.valid.at[slot_ids].set(valid_rows, mode="drop"),
    )
    put = lambda dst, src: dst.at[slot_ids].set(src, mode="drop")  # noqa: E731
    new = DecodeState(
        cache=cache,
        tokens=put(state.tokens, prefix.tokens),
        positions=put(state.positions, prefix.lengths),
        steps=put(state.steps, jnp.ones_like(prefix.lengths)),
        params=jax.tree.map(put, state.params, prefix.params),
    )
    return _constrain(new, specs, mesh)


def _generate_impl(weights: Weights, state: DecodeState, *, cfg: GPTJConfig, mesh, specs) -> tuple[DecodeState, StepOutput]:
    slots = state.tokens.shape[0]
    hidden, cache = forward(
        weights, cfg, state.tokens[:, None], state.positions[:, None], jnp.ones((slots, 1), jnp.bool_),
        state.cache, state.positions,
    )
    tokens, logprobs = sample(logits(weights, hidden[:, 0]), state.params, state.steps, cfg.real_vocab_size)
    new = DecodeState(
        cache=cache,
        tokens=tokens,
        positions=jnp.minimum(state.positions + 1, state.cache.length - 1),
        steps=state.steps + 1,
        params=state.params,
    )
    return _constrain(new, specs, mesh), StepOutput(tokens=tokens, logprobs=logprobs)


class DenseEngine(api.Engine):
    """The engine API over a slot-contiguous KV cache (see the module docstring)."""

    def __init__(self, weights: Weights, model_config: GPTJConfig, config: EngineConfig = EngineConfig(), mesh=None):
        config.validate(model_config)
        self.weights = weights
        self.model_config = model_config
        self.config = config
        self.mesh = mesh if mesh is not None else shard_lib.make_mesh(1)
        self.cache_len = config.cache_len(model_config)
        self.dtype = activation_dtype(weights)
        self._limits = Limits(model_config.real_vocab_size, tuple(config.prompt_buckets), self.cache_len)
        self._state_specs = DecodeState.param_specs(model_config, config.slots, self.cache_len, self.dtype,
                                                    config.kv_int8)
        kw = dict(cfg=model_config, mesh=self.mesh)
        self._prefill = jax.jit(functools.partial(_prefill_impl, kv_int8=config.kv_int8, **kw))
        self._insert = jax.jit(functools.partial(_insert_impl, specs=self._state_specs, **kw), donate_argnums=(1,))
        self._generate = jax.jit(functools.partial(_generate_impl, specs=self._state_specs, **kw), donate_argnums=(1,))

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

    # -- the API --------------------------------------------------------------------------------

    def init_decode_state(self) -> DecodeState:
        return jax.device_put(shard_lib.zeros(self._state_specs), shard_lib.shardings(self.mesh, self._state_specs))

    def prefill(self, prompts: Sequence[Sequence[int]], params: SamplingParams, existing_prefix=None) -> Prefix:
        """Prefill a batch of token-id prompts (padded here to buckets). `params` has one row per
        prompt (host arrays); padding rows get greedy settings."""
        if existing_prefix is not None:
            raise NotImplementedError("the dense engine prefills whole prompts; continuing a prefix needs pages")
        n = len(prompts)
        if n == 0:
            raise ValueError("prefill needs at least one prompt")
        t = self._bucket(max(len(p) for p in prompts), self.config.prompt_buckets, "prompt")
        b = self._bucket(n, self.config.batch_buckets, "prefill batch")
        tokens = np.zeros((b, t), np.int32)
        lengths = np.zeros((b,), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
            lengths[row] = len(prompt)
        return self._prefill(self.weights, tokens, lengths, _pad_rows(params, b))

    def insert(self, prefix: Prefix, state: DecodeState, slots: Sequence[int]) -> DecodeState:
        """Put prefix rows 0..len(slots)-1 into those slots; the rest of the padded batch is dropped."""
        b = prefix.tokens.shape[0]
        slot_ids = np.full((b,), self.config.slots, np.int32)
        slot_ids[: len(slots)] = slots
        return self._insert(prefix, state, slot_ids)

    def generate(self, state: DecodeState) -> tuple[DecodeState, StepOutput]:
        return self._generate(self.weights, state)

    @staticmethod
    def _bucket(size: int, buckets: Sequence[int], what: str) -> int:
        bucket = smallest_fitting(size, buckets)
        if bucket is None:  # the driver checks requests against `limits` first: a caller's bug
            raise ValueError(f"{what} of {size} exceeds the largest bucket {buckets[-1]}")
        return bucket

    # -- warm-up ----------------------------------------------------------------------------------

    def warmup(self, progress: bool = True) -> float:
        """Compile every prefill / insert shape and the decode step; returns the seconds it took."""
        start = self._warmup_started()
        state = self.init_decode_state()
        shapes = [(t, b) for t in self.config.prompt_buckets for b in self.config.batch_buckets]
        for i, (t, b) in enumerate(shapes):
            if progress:
                print(f"warm-up: prefill+insert shape {i + 1}/{len(shapes)} (prompt {t}, batch {b}), "
                      f"{time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)
            params = SamplingParams.host([0.0] * b, [0] * b, [1.0] * b, [0] * b)
            prefix = self.prefill([[0] * t] * b, params)  # length t selects bucket t
            state = self.insert(prefix, state, list(range(b)))
        state, out = self.generate(state)
        jax.block_until_ready(out)
        seconds = self._warmed_up(start)
        if progress:
            print(f"warm-up: {len(shapes)} prefill shapes and the decode step compiled in {seconds:.1f}s",
                  file=sys.stderr, flush=True)
        return seconds


def _pad_rows(params: SamplingParams, rows: int) -> SamplingParams:
    """Pad host sampling settings to `rows` rows with greedy, unfiltered settings."""
    n = len(params.temperature)
    greedy = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, seed=0)
    return jax.tree.map(lambda a, fill: np.pad(np.asarray(a), (0, rows - n), constant_values=fill), params, greedy)
