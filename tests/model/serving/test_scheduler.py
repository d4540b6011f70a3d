"""The scheduler's plans, without an engine: who is admitted, into which slots and pages, what a
cancellation frees, and who is preempted when the pages run out."""

import pytest

from model.serving.pages import PageLayout
from model.serving.request import Limits, Request, RequestRejected
from model.serving.scheduler import Scheduler

LIMITS = Limits(vocab_size=1000, prompt_buckets=(8, 32), max_total_length=64)
LAYOUT = PageLayout(page_size=8, num_pages=64, pages_per_seq=8)  # never runs out in these tests


def req(length, request_id=None, **kw):
    return Request([1] * length, 4, **({"request_id": request_id} if request_id else {}), **kw)


def test_the_oldest_request_picks_the_bucket_and_same_bucket_requests_join_it():
    s = Scheduler(LIMITS, LAYOUT, slots=4, max_prefill_batch=4)
    s.add([req(20, "long1"), req(3, "short1"), req(30, "long2"), req(5, "short2")], now=0.0)
    plan = s.schedule()
    assert plan.prefill.bucket == 32 and [r.request_id for r in plan.prefill.requests] == ["long1", "long2"]
    assert plan.prefill.slots == [0, 1]
    plan = s.schedule()
    assert plan.prefill.bucket == 8 and [r.request_id for r in plan.prefill.requests] == ["short1", "short2"]
    assert plan.prefill.slots == [2, 3] and s.active_slots == 4 and s.waiting == 0


def test_a_batch_is_bounded_by_free_slots_and_the_largest_prefill_batch():
    s = Scheduler(LIMITS, LAYOUT, slots=3, max_prefill_batch=2)
    s.add([req(2) for _ in range(5)], now=0.0)
    assert len(s.schedule().prefill.requests) == 2
    assert len(s.schedule().prefill.requests) == 1  # one slot left
    assert s.schedule().prefill is None and s.waiting == 2


def test_finishing_frees_the_slot_for_the_next_plan():
    s = Scheduler(LIMITS, LAYOUT, slots=1, max_prefill_batch=1)
    first, second = s.add([req(2, "a"), req(2, "b")], now=0.0)
    assert s.schedule().prefill.requests == [first]
    assert s.schedule().prefill is None
    s.finish(first)
    plan = s.schedule()
    assert plan.prefill.requests == [second] and plan.prefill.slots == [0]


def test_cancellation_frees_slots_before_admission_in_the_same_plan():
    s = Scheduler(LIMITS, LAYOUT, slots=1, max_prefill_batch=1)
    s.add([req(2, "running"), req(2, "next")], now=0.0)
    s.schedule()
    s.cancel("running")
    s.cancel("unknown")  # ignored
    plan = s.schedule()
    assert [c.request_id for c in plan.cancelled] == ["running"] and plan.freed_slots == [0]
    assert [r.request_id for r in plan.prefill.requests] == ["next"]


def test_a_waiting_request_can_be_cancelled():
    s = Scheduler(LIMITS, LAYOUT, slots=1, max_prefill_batch=1)
    s.add([req(2, "a"), req(2, "b")], now=0.0)
    s.cancel("b")
    plan = s.schedule()
    assert [c.request_id for c in plan.cancelled] == ["b"] and plan.freed_slots == []
    assert s.waiting == 0 and s.active_slots == 1


def test_seeds_are_resolved_in_the_scheduler_not_the_request():
    s = Scheduler(LIMITS, LAYOUT, slots=2, max_prefill_batch=2)
    seeded, unseeded = s.add([req(2, seed=7), req(2)], now=0.0)
    assert seeded.seed == 7 and 0 <= unseeded.seed < 2**31 and unseeded.request.seed is None


def test_add_is_all_or_none():
    s = Scheduler(LIMITS, LAYOUT, slots=1, max_prefill_batch=1, max_waiting=2)
    with pytest.raises(OverflowError):
        s.add([req(2), req(2), req(2)], now=0.0)
    with pytest.raises(RequestRejected, match="'x' is already in flight"):
        s.add([req(2, "x"), req(2, "x")], now=0.0)
    assert s.waiting == 0 and not s.has_work()


def test_drain_empties_everything():
    s = Scheduler(LIMITS, LAYOUT, slots=1, max_prefill_batch=1)
    s.add([req(2, "a"), req(2, "b")], now=0.0)
    s.schedule()
    assert {x.request_id for x in s.drain()} == {"a", "b"}
    assert s.active_slots == 0 and s.waiting == 0 and s.slot_owners() == [None]


# -- pages ------------------------------------------------------------------------------------------

def decode_steps(s, n):
    """n steps of the driver's loop without an engine: plan, then every occupied slot decodes."""
    plans = []
    for _ in range(n):
        plans.append(s.schedule())
        s.decoded()
    return plans


def test_admission_takes_the_prompts_pages_and_decoding_takes_one_more_per_page_of_tokens():
    s = Scheduler(LIMITS, PageLayout(page_size=8, num_pages=10, pages_per_seq=8), slots=2, max_prefill_batch=2)
    a, b = s.add([Request([1] * 15, 20, request_id="a"), Request([1] * 17, 20, request_id="b")], now=0.0)
    decode_steps(s, 1)  # both admitted: 15 + 1 tokens = 2 pages, 17 + 1 tokens = 3 pages
    assert s.pages.pages_of(a.slot) == [1, 2] and s.pages.pages_of(b.slot) == [3, 4, 5]
    assert s.pages.lengths.tolist() == [16, 18]
    decode_steps(s, 1)  # a's 17th token needs a third page; b's 19th still fits its third
    assert s.pages.pages_of(a.slot) == [1, 2, 6] and len(s.pages.pages_of(b.slot)) == 3
    assert s.kv_usage() == {"kv_pages_total": 10, "kv_pages_used": 6, "kv_pages_free": 4, "kv_cache_usage_perc": 0.6,
                            "kv_pages_cached": 0}
    s.finish(a)
    assert s.kv_usage()["kv_pages_used"] == 3 and s.pages.lengths[0] == 0 and s.pages.table[0].tolist() == [0] * 8


def test_when_pages_run_out_the_youngest_is_preempted_and_requeued_first_with_what_it_generated():
    s = Scheduler(LIMITS, PageLayout(page_size=8, num_pages=4, pages_per_seq=8), slots=3, max_prefill_batch=1,
                  prefill_buckets=(8, 32, 64))
    old, young, waiting = s.add([Request([1] * 8, 20, request_id="old"), Request([1] * 8, 20, request_id="young"),
                                 Request([1] * 8, 20, request_id="waiting")], now=0.0)
    decode_steps(s, 2)  # old then young admitted (2 pages each: 8 + 1 tokens); the pool is full
    assert s.waiting == 1 and s.pages.pages_free == 0
    young.generated = [5] * 7  # what the driver delivered
    for _ in range(6):  # old's tokens 10..16 fit its two pages
        assert s.schedule().preempted == []
        s.decoded()
    plan = s.schedule()  # old's 17th token needs a third page: young gives its two back
    assert plan.preempted == [young] and plan.freed_slots == [1] and young.slot is None
    assert young.preemptions == 1 and s.preemptions == 1 and young.bucket == 32  # 8 prompt + 7 generated tokens
    assert list(s._waiting) == [young, waiting]  # first in line again
    assert len(s.pages.pages_of(old.slot)) == 3 and s.pages.pages_free == 1
    assert young.tokens == [1] * 8 + [5] * 7


def test_a_request_that_fits_the_pool_alone_is_never_preempted():
    s = Scheduler(LIMITS, PageLayout(page_size=8, num_pages=8, pages_per_seq=8), slots=2, max_prefill_batch=2)
    (only,) = s.add([Request([1] * 8, 56, request_id="only")], now=0.0)
    plans = decode_steps(s, 56)
    assert all(p.preempted == [] for p in plans) and len(s.pages.pages_of(only.slot)) == 8


def test_admission_waits_first_come_first_served_for_pages():
    s = Scheduler(LIMITS, PageLayout(page_size=8, num_pages=5, pages_per_seq=8), slots=3, max_prefill_batch=3)
    s.add([req(30, "big"), req(30, "big2"), req(3, "small")], now=0.0)
    plan = s.schedule()  # big takes 4 of 5 pages; big2 does not fit, and small waits behind it
    assert [r.request_id for r in plan.prefill.requests] == ["big"]
    assert s.schedule().prefill is None and s.waiting == 2


def test_cancelling_a_decoding_request_gives_its_pages_back():
    s = Scheduler(LIMITS, PageLayout(page_size=8, num_pages=6, pages_per_seq=8), slots=2, max_prefill_batch=2)
    (a,) = s.add([req(20, "a")], now=0.0)
    decode_steps(s, 1)
    assert s.pages.pages_used == 3
    s.cancel("a")
    plan = s.schedule()
    assert plan.cancelled == [a] and plan.freed_slots == [0] and s.pages.pages_used == 0


# -- chunked prefill ----------------------------------------------------------------------------------

def chunking_scheduler(**kw):
    return Scheduler(LIMITS, PageLayout(page_size=8, num_pages=64, pages_per_seq=8), prefill_chunk_tokens=16,
                     prefill_buckets=(8, 16), **kw)


def test_a_long_prompt_is_admitted_alone_and_prefilled_chunk_by_chunk_while_others_decode():
    s = chunking_scheduler(slots=3, max_prefill_batch=2)
    (short,) = s.add([req(5, "short")], now=0.0)
    plan = s.schedule()
    assert [r.request_id for r in plan.prefill.requests] == ["short"] and plan.chunk is None
    s.decoded()
    long, later = s.add([Request(list(range(40)), 4, request_id="long"), req(6, "later")], now=1.0)
    assert long.bucket == 0 and short.bucket == 8
    chunks = []
    for _ in range(3):
        plan = s.schedule()
        assert plan.prefill is None  # "later" waits behind the long prompt (first come, first served)
        chunks.append((plan.chunk.start, len(plan.chunk.tokens), plan.chunk.final))
        assert s.slot_owners()[long.slot] is (long if plan.chunk.final else None)  # no token before its prompt is in
        s.decoded()
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]
    assert len(s.pages.pages_of(long.slot)) == 6 and s.pages.lengths[long.slot] == 41  # 40 + its first decode
    assert s.pages.lengths[short.slot] == 5 + 4  # it decoded on every step
    assert [r.request_id for r in s.schedule().prefill.requests] == ["later"]


def test_cancelling_a_prompt_mid_chunk_frees_its_slot_and_pages():
    s = chunking_scheduler(slots=2, max_prefill_batch=2)
    (long,) = s.add([Request(list(range(40)), 4, request_id="long")], now=0.0)
    assert s.schedule().chunk.start == 0 and s.pages.pages_used == 6
    s.cancel("long")
    plan = s.schedule()
    assert plan.cancelled == [long] and plan.chunk is None and s.pages.pages_used == 0 and s.active_slots == 0


def test_the_chunk_is_the_prefill_budget_of_a_whole_prompt_batch():
    s = chunking_scheduler(slots=4, max_prefill_batch=4)
    s.add([req(7) for _ in range(4)], now=0.0)
    assert len(s.schedule().prefill.requests) == 2  # bucket 8: 16 // 8 rows


def test_a_preempted_long_request_is_recomputed_in_chunks():
    s = Scheduler(LIMITS, PageLayout(page_size=8, num_pages=7, pages_per_seq=8), slots=2, max_prefill_batch=1,
                  prefill_chunk_tokens=16, prefill_buckets=(8, 16))
    old, young = s.add([req(7, "old"), Request([1] * 8, 40, request_id="young")], now=0.0)
    decode_steps(s, 2)  # both admitted: 1 page and 2 pages
    young.generated = [2] * 20
    s.pages.lengths[young.slot] = 28  # as if young had decoded 20 tokens: give it its 4 pages
    assert s.pages.allocate(young.slot, 29)
    for _ in range(16):  # old grows to 3 pages; then young must go
        plan = s.schedule()
        s.decoded()
        if plan.preempted:
            break
    assert plan.preempted == [young] and young.bucket == 0  # 8 + 20 tokens > the 16-token chunk
    assert plan.chunk is None and plan.prefill is None  # a step that preempts starts nothing new
    plan = s.schedule()
    assert plan.chunk is not None and plan.chunk.request is young and plan.chunk.tokens == young.tokens[:16]
