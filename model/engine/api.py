"""The engine API: what a driver may rely on, in the shape of JetStream's `engine_api.py`.

An engine owns a model on a mesh and runs it in static shapes; it knows nothing of requests, queues
or threads (that is `model.serving`). A request's life, as a driver runs it:

  1. `prefill(prompts, params, steps=)`: a batch of prompts (padded to a prefill bucket and a batch
     bucket) runs through the model in one call: each prompt's KV cache prefix, and its first token
     sampled with its own settings at its own sampling step (0 for a new request; a request recomputed
     after preemption continues from the tokens it had). `existing_prefix` continues a prefix already
     computed (chunked prefill, prefix caching): the new tokens attend to it. An engine that cannot
     continue prefixes raises NotImplementedError for it.
  2. `insert(prefix, state, slots, pages)`: each prefix row goes into a free decode slot, its keys and
     values into the pages the slot holds in `pages` (model.serving.pages.PagePool); the other slots
     keep decoding undisturbed (continuous batching).
  3. `generate(state, pages)`: one decode step for every slot: each slot's next token and its
     logprob, its key and value written at position `pages.lengths[slot]`. Repeated until the driver
     decides the request is done (stop token, stop string, max_tokens).
  4. `fork(state, forks, copies)` (beam search): after a step, each beam's slot continues the
     sequence of the beam it extends: it takes that slot's settings and is fed its chosen token, and
     the pages the host gives it (model.serving.pages.PagePool.fork) get copies of what they must
     hold. The full pages before are shared, so a fork copies at most one page per beam.
  5. `free_resource(slot)`: the request in `slot` has ended; the engine releases what it held for it
     beyond its pages (which the scheduler takes back). The slot is then free for the next insert.

Shapes: `limits` says what a request may be (vocabulary, prompt buckets, context), and the driver
checks every request against it before anything runs. `max_concurrent_decodes` is the slot count (the
decode batch; a beam request takes one slot per beam); `top_candidates` how many most likely tokens
every prefill row and decode step reports (beam search and top logprobs read them); `page_layout` is the KV pool the scheduler allocates from (page size, pages, pages per sequence);
`prefill_buckets` the prompt lengths prefill takes (the prompt buckets, and what a recompute needs).

Static shapes, proved: `warmup()` compiles every shape serving will use before the engine reports
ready, and `compilations_since_warmup` counts what compiled afterwards (it must stay 0).

The decode state and prefixes are engine-defined pytrees, passed back in as they came out (donated
on devices); a driver reads only the `tokens`, `logprobs`, `top_tokens` and `top_logprobs` of a
prefix and of a step's output.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from typing import Any, Protocol, Sequence

from model.engine.compilations import compilation_count
from model.serving.pages import PageLayout, PagePool
from model.serving.request import Limits


class Sampled(Protocol):
    """What prefill and a decode step return for the driver: one token per row (prompt or slot)."""

    tokens: Any  # [rows] int32, device or host array
    logprobs: Any  # [rows] float32: the model's own log-probability of each token
    top_tokens: Any  # [rows, top_candidates] int32: the most likely tokens, best first
    top_logprobs: Any  # [rows, top_candidates] float32: their own log-probabilities


Prefix = Any  # an engine's prefill result (a Sampled with the KV prefix it computed)


@dataclasses.dataclass(frozen=True)
class PoolPrefix:
    """A prefix already in the KV page pool, for `prefill(existing_prefix=)`: the prompt row continues
    slot `slot`'s sequence after its first `start` tokens (a multiple of the page size), which it
    attends to where they lie: `state`'s pool, at the pages `pages` lists for the slot. Chunked
    prefill continues a prompt this way, chunk by chunk."""

    state: Any
    pages: PagePool
    slot: int
    start: int
DecodeState = Any  # an engine's decode slots (KV cache, last tokens, positions, sampling settings)


class Engine(abc.ABC):
    """Prefill / insert / generate for one model on one mesh. Not thread-safe: one caller drives it."""

    warmup_seconds: float | None = None
    _compiles_at_warmup: int | None = None

    # -- what a request may be ------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def limits(self) -> Limits:
        """Vocabulary, prompt buckets and context: the checks every request must pass."""

    @property
    @abc.abstractmethod
    def eos_token_id(self) -> int: ...

    @property
    @abc.abstractmethod
    def max_concurrent_decodes(self) -> int:
        """Decode slots."""

    @property
    @abc.abstractmethod
    def max_prefill_batch(self) -> int:
        """The most prompts one prefill call takes (the largest batch bucket)."""

    @property
    def max_prefill_length(self) -> int:
        return self.limits.max_prompt_length

    @property
    def max_total_length(self) -> int:
        """Prompt plus generated tokens must fit here."""
        return self.limits.max_total_length

    @property
    @abc.abstractmethod
    def page_layout(self) -> PageLayout:
        """The KV page pool: page size, pages to hand out, most pages one sequence holds."""

    @property
    def prefill_chunk_tokens(self) -> int | None:
        """Chunked prefill: prompts longer than this are prefilled this many tokens per step, each
        chunk continuing the last (`prefill(existing_prefix=PoolPrefix)`); None: whole prompts only."""
        return None

    @property
    def prefix_caching(self) -> bool:
        """Whether requests share the cached KV pages of a common prompt prefix (the scheduler's
        PagePool keeps them; the rest of a prompt is prefilled as a chunk continuing them)."""
        return False

    @property
    def prefill_buckets(self) -> tuple[int, ...]:
        """Prompt lengths `prefill` takes: the prompt buckets, and longer ones for recomputes."""
        return self.limits.prompt_buckets

    @property
    def top_candidates(self) -> int:
        """The most likely tokens every prefill row and decode step reports (`Sampled.top_tokens`)."""
        return 1

    # -- the lifecycle --------------------------------------------------------------------------

    @abc.abstractmethod
    def init_decode_state(self) -> DecodeState:
        """Every slot empty."""

    @abc.abstractmethod
    def prefill(self, prompts: Sequence[Sequence[int]], params, existing_prefix: Prefix | None = None,
                steps: Sequence[int] | None = None) -> Prefix:
        """Prefill a batch of token-id prompts; `params` (model.engine.sampling.SamplingParams of host
        arrays) has one row per prompt; `steps` each prompt's first sampling step (default 0)."""

    @abc.abstractmethod
    def insert(self, prefix: Prefix, state: DecodeState, slots: Sequence[int], pages: PagePool) -> DecodeState:
        """Put prefix rows 0..len(slots)-1 into those slots and the pages they hold."""

    @abc.abstractmethod
    def generate(self, state: DecodeState, pages: PagePool) -> tuple[DecodeState, Sampled]:
        """One decode step for every slot, over the block tables and lengths of `pages`."""

    def fork(self, state: DecodeState, forks: Sequence[tuple[int, int, int]],
             copies: Sequence[tuple[int, int]]) -> DecodeState:
        """Beam search's reorder: each (dst slot, src slot, token) gives dst src's sampling settings
        and step and feeds it `token` next; each (src page, dst page) copies a page. At most
        `max_concurrent_decodes` of each per call."""
        raise NotImplementedError(f"{type(self).__name__} does not support beam search")

    def free_resource(self, slot: int) -> None:
        """The request in `slot` ended: release what the engine holds for it (nothing, by default)."""

    # -- warm-up and compile accounting -----------------------------------------------------------

    @abc.abstractmethod
    def warmup(self, progress: bool = True) -> float:
        """Compile every shape serving uses; returns the seconds it took (see `_warmed_up`)."""

    def _warmup_started(self) -> float:
        compilation_count()  # the counter listens from here on
        return time.perf_counter()

    def _warmed_up(self, started: float) -> float:
        """Record the end of warm-up: from now on every compilation is counted against the engine."""
        self.warmup_seconds = time.perf_counter() - started
        self._compiles_at_warmup = compilation_count()
        return self.warmup_seconds

    @property
    def compilations_since_warmup(self) -> int | None:
        """XLA compilations in this process since warm-up finished (None before warm-up)."""
        if self._compiles_at_warmup is None:
            return None
        return compilation_count() - self._compiles_at_warmup
