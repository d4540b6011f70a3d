"""The scheduler: decides each step's work (vLLM's `scheduler.py` is the anchor), executes none of it.

It owns the host-side bookkeeping of a driver: the queue of waiting requests, which request holds
which decode slot, the cancellations not yet applied. Each step the driver asks it for a `StepPlan`:

  1. cancellations: every request cancelled since the last plan leaves the queue or its slot (the
     slot is free from this step on);
  2. admission: the oldest waiting request picks the prompt bucket, and up to (free slots, the
     engine's largest prefill batch) waiting requests of that bucket, oldest first, are taken for one
     prefill and given free slots, lowest first. Requests of other buckets wait for a later step, so
     one prefill never mixes buckets and a long prompt never waits behind a stream of short ones for
     more than the steps it takes their bucket to drain.

Everything else in the plan is implied: every occupied slot decodes. The driver runs the plan on
the engine, hands tokens to output processing, and calls `finish` when a request has ended (stop,
length, cancellation, error). Slots, pages and prefill chunks of later engines are decided here too.

Not thread-safe: the driver serialises every call under its lock. No JAX, no engine calls.
"""

from __future__ import annotations

import collections
import dataclasses
import random
from typing import Sequence

from model.serving.request import Limits, Request, RequestRejected

_seed_source = random.SystemRandom()


@dataclasses.dataclass(eq=False)
class Scheduled:
    """One request's place in the scheduler."""

    request: Request
    seed: int  # the request's seed, or a fresh random one (the request itself is never written)
    submitted_at: float
    bucket: int  # its prompt bucket
    slot: int | None = None  # its decode slot once admitted

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclasses.dataclass
class PrefillBatch:
    bucket: int
    requests: list[Scheduled]  # in admission order, each already given its slot
    slots: list[int]  # slots[i] is requests[i]'s


@dataclasses.dataclass
class StepPlan:
    cancelled: list[Scheduled]  # ended by cancellation; none holds a slot any more
    freed_slots: list[int]  # the slots they held, for the engine to release before the prefill
    prefill: PrefillBatch | None  # prompts to prefill and insert this step (free slots included)


class Scheduler:
    def __init__(self, limits: Limits, slots: int, max_prefill_batch: int, max_waiting: int | None = None):
        self.limits = limits
        self.max_prefill_batch = max_prefill_batch
        self.max_waiting = max_waiting
        self._waiting: collections.deque[Scheduled] = collections.deque()
        self._slots: list[Scheduled | None] = [None] * slots
        self._cancelled: set[str] = set()
        self._live: dict[str, Scheduled] = {}  # waiting or decoding, by request id

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
                      self.limits.prompt_bucket(len(r.prompt_ids)))
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
        in_order = list(self._waiting) + [s for s in self._slots if s is not None]  # queue order, then slots
        ended = [s for s in in_order if s.request_id in cancelled]
        freed = [s.slot for s in ended if s.slot is not None]
        for s in ended:
            self.finish(s)
        return StepPlan(cancelled=ended, freed_slots=freed, prefill=self._admit())

    def _admit(self) -> PrefillBatch | None:
        free = [i for i, owner in enumerate(self._slots) if owner is None]
        if not free or not self._waiting:
            return None
        bucket = self._waiting[0].bucket
        limit = min(len(free), self.max_prefill_batch)
        batch = [s for s in self._waiting if s.bucket == bucket][:limit]
        taken = set(map(id, batch))
        self._waiting = collections.deque(s for s in self._waiting if id(s) not in taken)
        for s, slot in zip(batch, free):
            s.slot = slot
            self._slots[slot] = s
        return PrefillBatch(bucket, batch, free[: len(batch)])

    # -- requests out ---------------------------------------------------------------------------

    def finish(self, s: Scheduled) -> None:
        """`s` has ended: it leaves the queue or frees its slot. Idempotent."""
        if s.slot is not None:
            self._slots[s.slot] = None
            s.slot = None
        elif s in self._waiting:
            self._waiting.remove(s)
        self._live.pop(s.request_id, None)

    def drain(self) -> list[Scheduled]:
        """Remove every waiting and decoding request (the engine cannot go on); returns them."""
        everyone = list(self._waiting) + [s for s in self._slots if s is not None]
        for s in everyone:
            self.finish(s)
        return everyone

    # -- state ----------------------------------------------------------------------------------

    def slot_owners(self) -> list[Scheduled | None]:
        """Who holds each slot now (a decode step's tokens belong to these)."""
        return list(self._slots)

    @property
    def active_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.active_slots > 0 or bool(self._cancelled)
