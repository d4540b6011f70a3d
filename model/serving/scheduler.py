"""The scheduler: decides each step's work (vLLM's `scheduler.py` is the anchor), executes none of it.

It owns the host-side bookkeeping of a driver: the queue of waiting requests, which request holds
which decode slot, which KV pages each slot holds (a model.serving.pages.PagePool), the cancellations
not yet applied. Each step the driver asks it for a `StepPlan`:

  1. cancellations: every request cancelled since the last plan leaves the queue or its slot, and
     gives back its pages (free from this step on);
  2. growth: every decoding request, oldest first, gets the pages its next token needs (one more
     page every page_size tokens). When none is free, the youngest decoding request is preempted
     (vLLM's recompute preemption): its pages are freed, and it goes back to the front of the queue
     with everything it has generated, to be prefilled again from its prompt plus those tokens and
     continue where it was, its output identical to a run that was never preempted. A step that
     preempts admits nothing new (the pool is full);
  3. admission: the oldest waiting request picks the prefill bucket, and up to (free slots, the
     engine's largest prefill batch) waiting requests of that bucket, oldest first, are taken for one
     prefill and given free slots, lowest first, as long as their pages fit (prompt plus the first
     decode step's token); the first that does not fit stops admission (first come, first served).
     Requests of other buckets wait for a later step, so one prefill never mixes buckets and a long
     prompt never waits behind a stream of short ones for more than the steps it takes their bucket
     to drain.
     A beam request takes a slot per beam: its prompt is prefilled into the first, and the
     driver's first beam step forks it into the others (pages of the prompt shared, one page per
     beam beyond the first reserved for it at admission); its beams grow, are preempted (all
     together, to start again) and end together;
  4. chunked prefill (when the engine has `prefill_chunk_tokens` C): C is the step's prefill token
     budget (vLLM's max_num_batched_tokens, less the decode tokens). A prompt longer than C is
     admitted alone, takes its slot and all its pages, and is prefilled C tokens per step, each chunk
     continuing the last in the pool, while the decoding requests keep stepping; it decodes from the
     step of its last chunk. One long prompt is chunked at a time, and whole-prompt batches wait
     while it is (first come, first served); a whole-prompt batch has at most C // bucket rows.

Everything else in the plan is implied: every occupied slot decodes, and `decoded()` records that
each one's sequence grew by a token. The driver runs the plan on the engine, hands tokens to output
processing, and calls `finish` when a request has ended (stop, length, cancellation, error). A
request whose prompt plus max_tokens could never fit the pool never gets here: the engine's
`Limits` (kv_capacity_tokens) refuse it at submit.

Not thread-safe: the driver serialises every call under its lock. No JAX, no engine calls.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Sequence

from model.engine.buckets import smallest_fitting
from model.serving.pages import PageLayout, PagePool
from model.serving.request import Limits, Request, RequestRejected

_seed_source = random.SystemRandom()


@dataclasses.dataclass(eq=False)
class Scheduled:
    """One request's place in the scheduler."""

    request: Request
    seed: int  # the request's seed, or a fresh random one (the request itself is never written)
    submitted_at: float
    bucket: int  # the prefill bucket of `tokens` (0: it is prefilled in chunks)
    slot: int | None = None  # its decode slot once admitted (a beam request's first)
    slots: list[int] = dataclasses.field(default_factory=list)  # every slot it holds: one per beam
    reserved: int = 0  # pages kept back for its first beam fork
    admission: int | None = None  # when it was last admitted (an increasing count): youngest = largest
    generated: list[int] = dataclasses.field(default_factory=list)  # tokens delivered so far
    preemptions: int = 0
    prefilled: int = 0  # tokens of `tokens` in its pages so far, while its prompt is chunked

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tokens(self) -> list[int]:
        """What its next prefill runs: the prompt, plus what it generated before a preemption (a beam
        request's beams live in the driver's BeamSearch; a preempted one starts again)."""
        return list(self.request.prompt_ids) + self.generated

    @property
    def beams(self) -> int:
        return self.request.num_beams


@dataclasses.dataclass
class PrefillBatch:
    bucket: int
    requests: list[Scheduled]  # in admission order, each already given its slot
    slots: list[int]  # slots[i] is requests[i]'s


@dataclasses.dataclass
class PrefillChunk:
    request: Scheduled  # holds its slot and every page its prompt needs
    start: int  # tokens of `request.tokens` already in its pages (a multiple of the page size)
    tokens: list[int]  # the next chunk: request.tokens[start:start + prefill_chunk_tokens]
    final: bool  # the prompt's last chunk: the request decodes from this step on


@dataclasses.dataclass
class StepPlan:
    cancelled: list[Scheduled]  # ended by cancellation; none holds a slot any more
    preempted: list[Scheduled]  # back in the queue, to be recomputed; none holds a slot any more
    freed_slots: list[int]  # the slots both held, for the engine to release before the prefill
    prefill: PrefillBatch | None  # prompts to prefill and insert this step (free slots included)
    chunk: PrefillChunk | None = None  # or the next chunk of a long prompt (never both)


class Scheduler:
    def __init__(self, limits: Limits, layout: PageLayout, slots: int, max_prefill_batch: int,
                 prefill_buckets: Sequence[int] | None = None, max_waiting: int | None = None,
                 prefill_chunk_tokens: int | None = None, prefix_caching: bool = False):
        """`prefill_buckets`: what the engine prefills whole (default: the prompt buckets); a preempted
        request is recomputed in the one that holds its prompt and generated tokens, or in chunks.
        `prefill_chunk_tokens`: the engine's chunk (None: no chunked prefill). `prefix_caching`:
        share cached full pages of prompts (needs the chunk: the rest continues the cached prefix)."""
        self.limits = limits
        self.max_prefill_batch = max_prefill_batch
        self.prefill_buckets = tuple(prefill_buckets or limits.prompt_buckets)
        self.max_waiting = max_waiting
        self.pages = PagePool(layout, slots, prefix_caching)
        self._waiting: collections.deque[Scheduled] = collections.deque()
        self._slots: list[Scheduled | None] = [None] * slots
        self._cancelled: set[str] = set()
        self._live: dict[str, Scheduled] = {}  # waiting or decoding, by request id
        self._admissions = 0
        self.preemptions = 0
        self.chunk = prefill_chunk_tokens
        self._chunking: Scheduled | None = None  # the long prompt being prefilled chunk by chunk
        self.prefix_cache_queries = 0  # prompt tokens admitted (recomputes included), vLLM's counters
        self.prefix_cache_hits = 0  # of which were found in cached pages

    # -- requests in ----------------------------------------------------------------------------

    def add(self, requests: Sequence[Request], now: float) -> list[Scheduled]:
        """Queue already-checked requests, all or none: OverflowError past `max_waiting`, RequestRejected
        for a request id already in flight (ids address cancellation, so two live requests may not
        share one)."""
        if self.max_waiting is not None and len(self._waiting) + len(requests) > self.max_waiting:
            raise OverflowError(f"{len(self._waiting)} requests already waiting (limit {self.max_waiting})")
        ids = [r.request_id for r in requests]
        clash = next((i for n, i in enumerate(ids) if i in self._live or i in ids[:n]), None)
        if clash is not None:
            raise RequestRejected(f"request_id {clash!r} is already in flight", "request_id")
        added = [
            Scheduled(r, _seed_source.randrange(2**31) if r.seed is None else r.seed, now,
                      self._bucket(len(r.prompt_ids)))
            for r in requests
        ]
        self._waiting.extend(added)
        self._live.update((s.request_id, s) for s in added)
        return added

    def cancel(self, request_id: str) -> None:
        """Applied at the next plan; unknown or finished ids are ignored then."""
        self._cancelled.add(request_id)

    # -- the plan -------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        cancelled, self._cancelled = self._cancelled, set()
        in_order = list(self._waiting) + self._holding()  # queue order, then slots
        ended = [s for s in in_order if s.request_id in cancelled]
        freed = [slot for s in ended for slot in s.slots]
        for s in ended:
            self.finish(s)
        preempted = self._grow()
        freed += [slot for _, slot in preempted]
        if preempted:  # the pool is full: nothing new starts this step (a chunk in progress goes on)
            chunk = self._next_chunk() if self._chunking is not None else None
            return StepPlan(cancelled=ended, preempted=list(dict.fromkeys(s for s, _ in preempted)), freed_slots=freed,
                            prefill=None, chunk=chunk)
        chunk = self._next_chunk()
        return StepPlan(cancelled=ended, preempted=[], freed_slots=freed, prefill=None if chunk else self._admit(),
                        chunk=chunk)

    def _bucket(self, length: int) -> int:
        """The prefill bucket of a prompt (or a recompute) of `length` tokens; 0: it is chunked."""
        if self.chunk is not None and length > self.chunk:
            return 0
        return smallest_fitting(length, self.prefill_buckets)

    def _next_chunk(self) -> PrefillChunk | None:
        """The chunk of this step: the next one of the prompt being chunked, or the first of the
        oldest waiting request if it needs chunking and its pages fit."""
        s = self._chunking
        if s is None:
            free = [i for i, owner in enumerate(self._slots) if owner is None]
            if not self._waiting or len(free) < self._waiting[0].beams:
                return None
            s = self._waiting[0]
            # A request that scores its prompt computes all of it: cached pages hold no logits.
            shared = self.pages.cached_prefix(s.tokens) if s.request.prompt_logprobs is None else []
            if s.bucket != 0 and not shared:  # a whole-prompt prefill (`_admit`)
                return None
            cached = self.pages.admit(free[0], s.tokens, shared, reserve=s.beams - 1)
            if cached is None:
                return None
            self._waiting.popleft()
            self._seat(s, free[: s.beams], cached)
            s.prefilled = cached
            self._chunking = s
        start = s.prefilled
        tokens = s.tokens[start : start + self.chunk]
        s.prefilled += len(tokens)
        final = s.prefilled == len(s.tokens)
        if final:  # it decodes from this step on
            self.pages.lengths[s.slot] = len(s.tokens)
            self.pages.register(s.slot, s.tokens)
            self._chunking = None
        return PrefillChunk(s, start, tokens, final)

    def _grow(self) -> list[tuple[Scheduled, int]]:
        """Pages for every decoding request's next token, oldest first, preempting the youngest when
        none is free; returns the preempted requests with the slots they left."""
        preempted = []
        for s in sorted(self._decoding(), key=lambda s: s.admission):
            for slot in list(s.slots):
                while s.slot is not None and not self.pages.allocate(slot, int(self.pages.lengths[slot]) + 1):
                    victim = max(self._decoding(), key=lambda d: d.admission)
                    preempted += [(victim, held) for held in victim.slots]
                    self._preempt(victim)
        return preempted

    def _preempt(self, s: Scheduled) -> None:
        self._release(s)
        s.preemptions += 1
        s.bucket = self._bucket(len(s.tokens))
        self._waiting.appendleft(s)
        self.preemptions += 1

    def _admit(self) -> PrefillBatch | None:
        free = [i for i, owner in enumerate(self._slots) if owner is None]
        if not free or not self._waiting:
            return None
        bucket = self._waiting[0].bucket
        if bucket == 0:  # the oldest needs chunking: it starts when the chunk in flight is done
            return None
        limit = min(len(free), self.max_prefill_batch, max(self.chunk // bucket, 1) if self.chunk else len(free))
        batch, taken = [], 0
        for s in [s for s in self._waiting if s.bucket == bucket][:limit]:
            if taken + s.beams > len(free):
                break
            slot = free[taken]
            # The prompt and the first decode step's token, and a page per beam beyond the first.
            if self.pages.admit(slot, s.tokens, [], reserve=s.beams - 1) is None:
                break
            self.pages.lengths[slot] = len(s.tokens)
            self.pages.register(slot, s.tokens)  # written by this step's prefill, before anyone reads them
            self._seat(s, free[taken : taken + s.beams], 0)
            taken += s.beams
            batch.append(s)
        if not batch:
            return None
        taken = set(map(id, batch))
        self._waiting = collections.deque(s for s in self._waiting if id(s) not in taken)
        return PrefillBatch(bucket, batch, [s.slot for s in batch])

    def _seat(self, s: Scheduled, slots: list[int], cached: int) -> None:
        """`s` is admitted into `slots` (one per beam; the first's pages taken already, `cached` of its
        tokens from the cache, and a page per other beam reserved)."""
        s.slot, s.slots, s.admission = slots[0], list(slots), self._admissions
        s.reserved = len(slots) - 1
        self._admissions += 1
        for slot in slots:
            self._slots[slot] = s
        self.prefix_cache_queries += len(s.tokens)
        self.prefix_cache_hits += cached

    def _release(self, s: Scheduled) -> None:
        """`s` gives its slot and pages back (a prompt being chunked stops there); the full pages it
        wrote stay cached (prefix caching)."""
        written = s.prefilled if s is self._chunking else int(self.pages.lengths[s.slot])
        if s is self._chunking:
            self._chunking = None
        self.pages.register(s.slot, s.tokens[:written])
        self.pages.unreserve(s.reserved)
        for slot in s.slots:
            self.pages.free(slot)
            self._slots[slot] = None
        s.slot, s.slots, s.reserved = None, [], 0

    def fork_beams(self, s: Scheduled, parents: list[int]) -> list[tuple[int, int]]:
        """After a beam step of `s`: the beam in s.slots[j] continues the beam in s.slots[parents[j]].
        Returns the page copies the engine must make (model.serving.pages.PagePool.fork)."""
        self.pages.unreserve(s.reserved)  # the first fork takes them
        s.reserved = 0
        return self.pages.fork(s.slots, [s.slots[p] for p in parents], int(self.pages.lengths[s.slot]))

    def decoded(self) -> None:
        """A decode step ran for every occupied slot: each sequence holds one more token."""
        for s in self._decoding():
            self.pages.lengths[s.slots] += 1

    def _holding(self) -> list[Scheduled]:
        """Every request holding slots, once each, by its first slot."""
        return list(dict.fromkeys(s for s in self._slots if s is not None))

    def _decoding(self) -> list[Scheduled]:
        return [s for s in self._holding() if s is not self._chunking]

    # -- requests out ---------------------------------------------------------------------------

    def finish(self, s: Scheduled) -> None:
        """`s` has ended: it leaves the queue or frees its slot. Idempotent."""
        if s.slot is not None:
            self._release(s)
        elif s in self._waiting:
            self._waiting.remove(s)
        self._live.pop(s.request_id, None)

    def drain(self) -> list[Scheduled]:
        """Remove every waiting and decoding request (the engine cannot go on); returns them."""
        everyone = list(self._waiting) + self._holding()
        for s in everyone:
            self.finish(s)
        return everyone

    # -- state ----------------------------------------------------------------------------------

    def slot_owners(self) -> list[Scheduled | None]:
        """Who decodes in each slot now (a decode step's tokens belong to these; a slot whose prompt
        is still being chunked is not one of them)."""
        return [s if s is not self._chunking else None for s in self._slots]

    @property
    def decoding_slots(self) -> int:
        return sum(len(s.slots) for s in self._decoding())

    @property
    def active_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def kv_usage(self) -> dict:
        """The page pool's occupancy (vLLM's `kv_cache_usage_perc` is a fraction too)."""
        total, used = self.pages.layout.num_pages, self.pages.pages_used
        return {"kv_pages_total": total, "kv_pages_used": used, "kv_pages_free": total - used,
                "kv_cache_usage_perc": used / total, "kv_pages_cached": self.pages.pages_cached}

    def has_work(self) -> bool:
        return bool(self._waiting) or self.active_slots > 0 or bool(self._cancelled)
