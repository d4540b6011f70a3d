"""The driver on the mock engine (model/engine/mock.py), whose tokens a person can compute: prompt
[..., t] generates t+1, t+2, ...; so every expectation below is written out by hand."""

import threading

import pytest

from model.engine.mock import MockEngine
from model.nn.config import GPT2_VOCAB_SIZE
from model.serving.driver import Driver
from model.serving.request import Request, RequestRejected
from model.text.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


def new_driver(tokenizer, **engine_kwargs):
    engine = MockEngine(**engine_kwargs)
    engine.warmup()
    return Driver(engine, tokenizer)


def run(driver, request):
    outputs = []
    driver.submit(request, outputs.append)
    while driver.has_work():
        driver.step()
    return outputs


def test_tokens_logprobs_and_text_are_the_mocks_arithmetic(tokenizer):
    [result] = new_driver(tokenizer).generate([Request([7, 10], 4)])
    assert result.token_ids == [11, 12, 13, 14]
    assert result.logprobs == [-0.75, 0.0, -0.25, -0.5]
    assert result.text == tokenizer.decode([11, 12, 13, 14]) and result.finish_reason == "length"


def test_stop_token_ends_the_request_and_is_not_returned(tokenizer):
    [result] = new_driver(tokenizer).generate([Request([100], 10, stop_token_ids=[104])])
    assert result.token_ids == [101, 102, 103] and result.finish_reason == "stop"


def test_eos_stops_only_when_asked(tokenizer):
    ignored, honoured = new_driver(tokenizer).generate([Request([50254], 4), Request([50254], 4, stop_at_eos=True)])
    assert ignored.token_ids == [50255, 50256, 0, 1]
    assert honoured.token_ids == [50255] and honoured.finish_reason == "stop"


def test_stop_string_is_matched_on_text_and_never_streamed(tokenizer):
    # Tokens 31..38 decode to "@ABCDEFG": stop at "DE" (tokens 35, 36), held back as soon as "D" arrives.
    assert tokenizer.decode(list(range(31, 39))) == "@ABCDEFG"
    outputs = run(new_driver(tokenizer), Request([30], 8, stop=["zz", "DE"]))
    assert "".join(o.text for o in outputs) == "@ABC"
    assert [t for o in outputs for t in o.token_ids] == [31, 32, 33, 34, 35, 36]
    assert outputs[-1].finished and outputs[-1].finish_reason == "stop"
    assert all("D" not in o.text for o in outputs)


def test_cancel_frees_the_slot_at_the_next_step_and_the_engine_is_told(tokenizer):
    driver = new_driver(tokenizer)
    outputs = run_partial(driver, Request([1, 2, 3], 50, request_id="long"), steps=3)
    assert driver.active_slots == 1
    driver.cancel("long")
    driver.step()
    assert driver.active_slots == 0
    assert outputs[-1].finished and outputs[-1].finish_reason == "cancelled"
    assert 1 <= sum(len(o.token_ids) for o in outputs) < 50
    assert driver.engine.freed == [0]


def run_partial(driver, request, steps):
    outputs = []
    driver.submit(request, outputs.append)
    for _ in range(steps):
        driver.step()
    return outputs


def test_every_finished_request_frees_its_slot_in_the_engine(tokenizer):
    driver = new_driver(tokenizer, slots=2)
    driver.generate([Request([1], 3), Request([1], 5), Request([1], 2)])
    assert sorted(driver.engine.freed) == [0, 0, 1]


def test_admission_batches_one_bucket_and_fills_free_slots(tokenizer):
    driver = new_driver(tokenizer, slots=4, prompt_buckets=(16, 64), max_prefill_batch=4)
    short = [Request([1] * 5, 3) for _ in range(3)]
    long = [Request([1] * 40, 3) for _ in range(2)]
    results = driver.generate([short[0], long[0], short[1], short[2], long[1]])
    # The oldest (short) picks bucket 16: three shorts together, then the longs as slots free up.
    assert driver.engine.prefill_batches == [3, 1, 1]
    assert all(r.token_ids == [2, 3, 4] for r in results)


def test_preempted_requests_stream_every_token_once_and_in_order(tokenizer):
    """Four requests of 100 tokens in a pool of 16 pages of 16 tokens (256 tokens): they preempt
    each other, are recomputed from prompt + generated, and still stream t+1, t+2, ... exactly."""
    driver = new_driver(tokenizer, slots=4, prompt_buckets=(16, 64), num_pages=16)
    outputs = {i: [] for i in range(4)}
    for i in range(4):
        driver.submit(Request([100 * (i + 1)] * 4, 100, request_id=str(i)), outputs[i].append)
    usage = []
    while driver.has_work():
        driver.step()
        usage.append(driver.kv_usage()["kv_cache_usage_perc"])
    assert driver.stats["preemptions"] > 0
    for i in range(4):
        start = 100 * (i + 1)
        assert [t for o in outputs[i] for t in o.token_ids] == list(range(start + 1, start + 101))
        assert outputs[i][-1].finish_reason == "length"
    assert max(usage) == 1.0 and usage[-1] == 0.0


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(tokenizer):
    """A 150-token prompt arrives while 3 requests decode: it is prefilled 32 tokens per step (5 chunks),
    every decoding request gets a token on every one of those steps, and all outputs are exact."""
    driver = new_driver(tokenizer, slots=4, prompt_buckets=(16, 256), prefill_chunk_tokens=32)
    outputs = {i: [] for i in range(4)}
    for i in range(3):
        driver.submit(Request([10 * (i + 1)], 40, request_id=str(i)), outputs[i].append)
    driver.step()
    driver.step()
    driver.submit(Request([7] * 149 + [500], 5, request_id="long"), outputs[3].append)
    before = [sum(len(o.token_ids) for o in outputs[i]) for i in range(3)]
    for _ in range(5):
        driver.step()
    assert [sum(len(o.token_ids) for o in outputs[i]) for i in range(3)] == [n + 5 for n in before]
    assert driver.stats["prefill_chunks"] == 5
    while driver.has_work():
        driver.step()
    for i in range(3):
        assert [t for o in outputs[i] for t in o.token_ids] == list(range(10 * (i + 1) + 1, 10 * (i + 1) + 41))
    assert [t for o in outputs[3] for t in o.token_ids] == [501, 502, 503, 504, 505]


def test_a_cached_prefix_is_counted_and_only_the_rest_is_prefilled(tokenizer):
    driver = new_driver(tokenizer, slots=2, prompt_buckets=(16, 64), prefill_chunk_tokens=32,
                        enable_prefix_caching=True)
    shared = list(range(1000, 1040))  # two full 16-token pages and 8 tokens more
    first, second = driver.generate([Request(shared + [5], 3, request_id="a")]) + \
        driver.generate([Request(shared + [7, 8], 3, request_id="b")])
    assert first.token_ids == [6, 7, 8] and second.token_ids == [9, 10, 11]
    assert driver.stats["prefix_cache_queries"] == 41 + 42 and driver.stats["prefix_cache_hits"] == 32
    assert driver.stats["prefill_chunks"] == 3  # a: 32 + 9 tokens; b: the 10 after its 32 cached ones, in one


def test_requests_are_not_written_to(tokenizer):
    request = Request([5], 3, temperature=1.0)  # no seed: the scheduler draws one for itself
    new_driver(tokenizer).generate([request])
    assert request.seed is None
    with pytest.raises(AttributeError):
        request.seed = 1


@pytest.mark.parametrize("request_kwargs, message, param", [
    (dict(prompt_ids=list(range(65)), max_tokens=1), "prompt has 65 tokens; the longest prompt served is 64", "prompt"),
    (dict(prompt_ids=list(range(60)), max_tokens=200), "= 260 exceeds the context limit of 256", "max_tokens"),
    (dict(prompt_ids=[], max_tokens=4), "prompt is empty", "prompt"),
    (dict(prompt_ids=[1, GPT2_VOCAB_SIZE], max_tokens=4), f"token id {GPT2_VOCAB_SIZE} is outside the vocabulary",
     "prompt"),
    (dict(prompt_ids=[1, -3], max_tokens=4), "token id -3 is outside the vocabulary", "prompt"),
    (dict(prompt_ids=[1], max_tokens=0), "max_tokens must be a positive integer", "max_tokens"),
    (dict(prompt_ids=[1], max_tokens=4, temperature=-0.5), "temperature must be >= 0", "temperature"),
    (dict(prompt_ids=[1], max_tokens=4, temperature=float("nan")), "temperature must be >= 0", "temperature"),
    (dict(prompt_ids=[1], max_tokens=4, temperature=1e308), r"temperature must be at most 3.4e\+38 \(float32\)",
     "temperature"),
    (dict(prompt_ids=[1], max_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\]", "top_p"),
    (dict(prompt_ids=[1], max_tokens=4, top_k=-1), r"top_k must be in \[0, 2\*\*31\)", "top_k"),
    (dict(prompt_ids=[1], max_tokens=4, top_k=2**40), r"top_k must be in \[0, 2\*\*31\)", "top_k"),
    (dict(prompt_ids=[1], max_tokens=4, seed=2**40), r"seed must be in \[0, 2\*\*31\)", "seed"),
    (dict(prompt_ids=[1], max_tokens=4, seed=-1), r"seed must be in \[0, 2\*\*31\)", "seed"),
])
def test_bad_requests_are_refused_with_the_reason_and_nothing_is_queued(tokenizer, request_kwargs, message, param):
    driver = new_driver(tokenizer)
    with pytest.raises(RequestRejected, match=message) as refused:
        driver.submit_many([(Request([1], 2), lambda o: None), (Request(**request_kwargs), lambda o: None)])
    assert refused.value.param == param
    assert not driver.has_work()  # all or none: the good request was not queued either


def test_duplicate_request_id_in_flight_is_refused(tokenizer):
    driver = new_driver(tokenizer)
    driver.submit(Request([1, 2], 5, request_id="dup"), lambda o: None)
    with pytest.raises(RequestRejected, match="request_id 'dup' is already in flight"):
        driver.submit(Request([3], 5, request_id="dup"), lambda o: None)
    while driver.has_work():
        driver.step()
    driver.submit(Request([3], 5, request_id="dup"), lambda o: None)  # finished ids can be reused


def test_waiting_limit_is_an_overflow(tokenizer):
    engine = MockEngine()
    driver = Driver(engine, tokenizer, max_waiting=2)
    driver.submit_many([(Request([1], 2), lambda o: None), (Request([2], 2), lambda o: None)])
    with pytest.raises(OverflowError, match="2 requests already waiting"):
        driver.submit(Request([3], 2), lambda o: None)


def test_fail_all_ends_every_request_with_the_error(tokenizer):
    driver = new_driver(tokenizer, slots=1)
    outputs = []
    driver.submit_many([(Request([1], 10, request_id="a"), outputs.append),
                        (Request([1], 10, request_id="b"), outputs.append)])
    driver.step()  # "a" decodes, "b" waits
    driver.fail_all(RuntimeError("device lost"))
    ended = {o.request_id: o for o in outputs if o.finished}
    assert set(ended) == {"a", "b"}
    assert all(o.finish_reason == "error" and o.error == "RuntimeError: device lost" for o in ended.values())
    with pytest.raises(RuntimeError, match="engine loop has failed"):
        driver.submit(Request([1], 2), lambda o: None)


def test_on_prefill_reports_bucket_and_waits(tokenizer):
    calls = []
    engine = MockEngine(prompt_buckets=(16, 64))
    driver = Driver(engine, tokenizer, on_prefill=lambda bucket, waited: calls.append((bucket, len(waited))))
    driver.generate([Request([1] * 3, 2), Request([1] * 3, 2), Request([1] * 30, 2)])
    assert calls == [(16, 2), (64, 1)]
    assert driver.stats["prefill_batches"] == 2 and driver.stats["prefill_rows"] == 3


def test_background_thread_serves_and_a_broken_engine_fails_callers(tokenizer):
    driver = new_driver(tokenizer)
    done = threading.Event()
    outputs = []

    def on_output(o):
        outputs.append(o)
        if o.finished:
            done.set()

    driver.start()
    driver.submit(Request([9], 3), on_output)
    assert done.wait(10)
    assert [t for o in outputs for t in o.token_ids] == [10, 11, 12]

    def broken(state, pages):
        raise RuntimeError("XLA error")

    driver.engine.generate = broken
    done.clear()
    outputs.clear()
    driver.submit(Request([9], 3), on_output)
    assert done.wait(10)
    assert outputs[-1].finish_reason == "error" and "XLA error" in outputs[-1].error
    assert driver.error is not None
    driver.stop(timeout=5)
