"""Beam search's host side: the page pool's fork (shared full pages, copied partial ones, nothing
leaked), and the driver on the mock engine, whose beams a person can compute (its candidates after
token t are t+1, t+2, ... with logprobs logprob(t+1), logprob(t+1) - 1, ..., so the best beam
follows t+1, t+2, ...): slots and pages per beam, preemption, cancellation, refusals. Equality with
transformers is tested on the real engine (tests/model/engine/test_beams.py)."""

import pytest

from model.engine.mock import MockEngine, mock_logprob
from model.serving.beams import BeamSearch
from model.serving.driver import Driver
from model.serving.pages import PageLayout, PagePool
from model.serving.request import Request, RequestRejected
from model.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


def test_fork_shares_full_pages_and_copies_partial_ones():
    pool = PagePool(PageLayout(page_size=4, num_pages=20, pages_per_seq=8), slots=4)
    assert pool.admit(0, list(range(6)), [], reserve=3) == 0  # 6 tokens + the next: 2 pages; 3 kept back
    assert pool.pages_used == 5 and pool.pages_free == 15  # reserved pages count as used
    full, tail = pool.pages_of(0)
    pool.lengths[0] = 6

    # The first fork: every beam continues slot 0; the partial page is copied for beams 1-3.
    pool.unreserve(3)
    copies = pool.fork([0, 1, 2, 3], [0, 0, 0, 0], 6)
    assert [src for src, _ in copies] == [tail] * 3
    assert pool.pages_of(0) == [full, tail] and all(pool.pages_of(s)[0] == full for s in (1, 2, 3))
    assert sorted(dst for _, dst in copies) == sorted(pool.pages_of(s)[1] for s in (1, 2, 3))
    assert pool.pages_used == 5 and list(pool.lengths) == [6] * 4

    # Two beams continue beam 1, beam 0 dies: the first child takes beam 1's partial page, and beam
    # 0's, freed, becomes the other's copy of it.
    own = {s: pool.pages_of(s)[1] for s in range(4)}
    copies = pool.fork([0, 1, 2, 3], [1, 1, 2, 3], 7)
    assert copies == [(own[1], own[0])]
    assert pool.pages_of(0) == [full, own[1]] and pool.pages_of(1) == [full, own[0]] and pool.pages_used == 5

    # At a page boundary nothing is copied: the beams share the full page they continue.
    copies = pool.fork([0, 1, 2, 3], [2, 2, 2, 2], 8)
    assert copies == [] and all(pool.pages_of(s) == [full, own[2]] for s in range(4))  # slot 2's is unchanged
    assert pool.pages_used == 2
    for s in range(4):
        pool.free(s)
    assert pool.pages_used == 0 and pool.pages_free == 20


def test_a_finished_search_takes_no_more_steps():
    search = BeamSearch(num_beams=2, max_new_tokens=1, eos_token_id=0)
    assert search.step([[5, 6, 7, 8]], [[-0.1, -0.2, -0.3, -0.4]]) == [0, 0]
    assert search.done and [h.tokens for h in search.finished] == [[5], [6]]
    with pytest.raises(RuntimeError, match="has ended"):
        search.step([[5, 6, 7, 8]] * 2, [[-0.1, -0.2, -0.3, -0.4]] * 2)


def beam_request(last: int, n: int, beams: int = 4, **kw) -> Request:
    return Request(prompt_ids=[3, last], max_tokens=n, num_beams=beams, **kw)


def expected_best(last: int, n: int, length_penalty: float = 1.0) -> tuple[list[int], float]:
    tokens = list(range(last + 1, last + 1 + n))
    return tokens, float(mock_logprob(tokens).sum()) / n**length_penalty


def test_mock_beam_search_takes_a_slot_per_beam_and_returns_every_beam(tokenizer):
    engine = MockEngine(slots=6)
    engine.warmup()
    driver = Driver(engine, tokenizer)
    outputs = {"beams": [], "single": []}
    driver.submit(beam_request(100, 6, length_penalty=2.0), outputs["beams"].append)
    driver.submit(Request(prompt_ids=[3, 200], max_tokens=6), outputs["single"].append)
    driver.submit(beam_request(300, 3, beams=3), outputs.setdefault("waits", []).append)
    driver.step()
    assert driver.active_slots == 5  # 4 beams + 1; the 3-beam request waits for slots
    while driver.has_work():
        driver.step()
    beams = outputs["beams"]
    assert len(beams) == 1 and beams[0].finished and beams[0].finish_reason == "length"  # one Output, at the end
    tokens, score = expected_best(100, 6, 2.0)
    assert beams[0].token_ids == tokens and beams[0].score == pytest.approx(score)
    assert beams[0].text == tokenizer.decode(tokens) and len(beams[0].beams) == 4
    assert [b.score for b in beams[0].beams] == sorted((b.score for b in beams[0].beams), reverse=True)
    assert [t for o in outputs["single"] for t in o.token_ids] == list(range(201, 207))
    assert outputs["waits"][0].token_ids == expected_best(300, 3)[0]
    assert driver.kv_usage()["kv_pages_used"] == 0 and driver.active_slots == 0 and len(engine.freed) == 4 + 1 + 3


def test_preempted_beam_requests_start_again_and_finish_the_same(tokenizer):
    """A pool that cannot hold two 4-beam requests' pages: the younger is preempted (all its beams)
    and searched again from its prompt; both end as they would alone."""
    engine = MockEngine(slots=8, page_size=4, num_pages=24)
    engine.warmup()
    driver = Driver(engine, tokenizer)
    results = driver.generate([beam_request(100, 20), beam_request(500, 20)])
    assert driver.stats["preemptions"] > 0
    for last, result in zip((100, 500), results):
        tokens, score = expected_best(last, 20)
        assert result.token_ids == tokens and result.score == pytest.approx(score)
    assert driver.kv_usage()["kv_pages_used"] == 0 and driver._scheduler.pages.pages_free == 24


def test_cancelling_a_beam_request_frees_its_slots_and_pages(tokenizer):
    engine = MockEngine(slots=4, page_size=4)
    engine.warmup()
    driver = Driver(engine, tokenizer)
    outputs = []
    request = beam_request(100, 50)
    driver.submit(request, outputs.append)
    for _ in range(10):
        driver.step()
    assert driver.active_slots == 4 and outputs == []
    driver.cancel(request.request_id)
    while driver.has_work():
        driver.step()
    assert [o.finish_reason for o in outputs] == ["cancelled"]
    assert sorted(set(engine.freed)) == [0, 1, 2, 3] and driver.kv_usage()["kv_pages_used"] == 0
    assert driver._scheduler.pages.pages_free == engine.page_layout.num_pages


@pytest.mark.parametrize("settings, field, message", [
    (dict(num_beams=5), "num_beams", r"num_beams must be an integer in \[1, 4\]"),
    (dict(num_beams=0), "num_beams", r"num_beams must be an integer in \[1, 4\]"),
    (dict(num_beams=2, temperature=0.7), "temperature", "temperature is not supported with beam search"),
    (dict(num_beams=2, stop=["x"]), "stop", "stop is not supported with beam search"),
    (dict(num_beams=2, stop_token_ids=[5]), "stop_token_ids", "stop_token_ids is not supported"),
    (dict(num_beams=2, length_penalty=float("nan")), "length_penalty", "length_penalty must be a finite number"),
    (dict(min_tokens=9), "min_tokens", r"min_tokens must be an integer in \[0, max_tokens=8\]"),
    (dict(num_beams=4, max_tokens=200), "max_tokens", "4 beams of prompt"),
])
def test_beam_settings_are_checked(tokenizer, settings, field, message):
    engine = MockEngine(slots=4, page_size=16, num_pages=40)  # 640 tokens of KV: not 4 beams x 202
    driver = Driver(engine, tokenizer)
    request = Request(**{"prompt_ids": [3, 4], "max_tokens": 8, **settings})
    with pytest.raises(RequestRejected, match=message) as e:
        driver.submit(request, lambda out: None)
    assert e.value.param == field
