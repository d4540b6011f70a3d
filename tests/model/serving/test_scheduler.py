"""The scheduler's plans, without an engine: who is admitted, into which slots, and what a
cancellation frees."""

import pytest

from model.serving.request import Limits, Request, RequestRejected
from model.serving.scheduler import Scheduler

LIMITS = Limits(vocab_size=1000, prompt_buckets=(8, 32), max_total_length=64)


def req(length, request_id=None, **kw):
    return Request([1] * length, 4, **({"request_id": request_id} if request_id else {}), **kw)


def test_the_oldest_request_picks_the_bucket_and_same_bucket_requests_join_it():
    s = Scheduler(LIMITS, slots=4, max_prefill_batch=4)
    s.add([req(20, "long1"), req(3, "short1"), req(30, "long2"), req(5, "short2")], now=0.0)
    plan = s.schedule()
    assert plan.prefill.bucket == 32 and [r.request_id for r in plan.prefill.requests] == ["long1", "long2"]
    assert plan.prefill.slots == [0, 1]
    plan = s.schedule()
    assert plan.prefill.bucket == 8 and [r.request_id for r in plan.prefill.requests] == ["short1", "short2"]
    assert plan.prefill.slots == [2, 3] and s.active_slots == 4 and s.waiting == 0


def test_a_batch_is_bounded_by_free_slots_and_the_largest_prefill_batch():
    s = Scheduler(LIMITS, slots=3, max_prefill_batch=2)
    s.add([req(2) for _ in range(5)], now=0.0)
    assert len(s.schedule().prefill.requests) == 2
    assert len(s.schedule().prefill.requests) == 1  # one slot left
    assert s.schedule().prefill is None and s.waiting == 2


def test_finishing_frees_the_slot_for_the_next_plan():
    s = Scheduler(LIMITS, slots=1, max_prefill_batch=1)
    first, second = s.add([req(2, "a"), req(2, "b")], now=0.0)
    assert s.schedule().prefill.requests == [first]
    assert s.schedule().prefill is None
    s.finish(first)
    plan = s.schedule()
    assert plan.prefill.requests == [second] and plan.prefill.slots == [0]


def test_cancellation_frees_slots_before_admission_in_the_same_plan():
    s = Scheduler(LIMITS, slots=1, max_prefill_batch=1)
    s.add([req(2, "running"), req(2, "next")], now=0.0)
    s.schedule()
    s.cancel("running")
    s.cancel("unknown")  # ignored
    plan = s.schedule()
    assert [c.request_id for c in plan.cancelled] == ["running"] and plan.freed_slots == [0]
    assert [r.request_id for r in plan.prefill.requests] == ["next"]


def test_a_waiting_request_can_be_cancelled():
    s = Scheduler(LIMITS, slots=1, max_prefill_batch=1)
    s.add([req(2, "a"), req(2, "b")], now=0.0)
    s.cancel("b")
    plan = s.schedule()
    assert [c.request_id for c in plan.cancelled] == ["b"] and plan.freed_slots == []
    assert s.waiting == 0 and s.active_slots == 1


def test_seeds_are_resolved_in_the_scheduler_not_the_request():
    s = Scheduler(LIMITS, slots=2, max_prefill_batch=2)
    seeded, unseeded = s.add([req(2, seed=7), req(2)], now=0.0)
    assert seeded.seed == 7 and 0 <= unseeded.seed < 2**31 and unseeded.request.seed is None


def test_add_is_all_or_none():
    s = Scheduler(LIMITS, slots=1, max_prefill_batch=1, max_waiting=2)
    with pytest.raises(OverflowError):
        s.add([req(2), req(2), req(2)], now=0.0)
    with pytest.raises(RequestRejected, match="'x' is already in flight"):
        s.add([req(2, "x"), req(2, "x")], now=0.0)
    assert s.waiting == 0 and not s.has_work()


def test_drain_empties_everything():
    s = Scheduler(LIMITS, slots=1, max_prefill_batch=1)
    s.add([req(2, "a"), req(2, "b")], now=0.0)
    s.schedule()
    assert {x.request_id for x in s.drain()} == {"a", "b"}
    assert s.active_slots == 0 and s.waiting == 0 and s.slot_owners() == [None]
