"""The paged engine, by hand and through the driver: the JetStream API equals a full forward pass,
static shapes with zero recompiles after warm-up across every page-count bucket, continuous batching
and preemption that never change a request's result, per-request sampling on the real model, EOS
from the model's config, no padding row sampled, a 4-device mesh equal to one device.
(The driver's own behaviour, stops, cancellation, rejections and the scheduler's page accounting, is
tested on the mock engine in tests/model/serving/.)"""

import dataclasses
import random

import jax
import numpy as np
import pytest

from model import ckpt
from model.engine.compilations import compilation_count
from model.engine.api import PoolPrefix
from model.engine.paged import EngineConfig, PagedEngine
from model.engine.sampling import SamplingParams
from model.nn import sharding, transformer
from model.serving.driver import Driver
from model.serving.pages import PagePool
from model.serving.request import Request
from model.text.tokenizer import Tokenizer

# page 8, 64 positions: page-count buckets 1, 2, 4, 8; prompts up to 30 + up to 30 new tokens reach them all.
CONFIG = EngineConfig(prompt_buckets=(8, 16, 32), batch_buckets=(1, 2, 4), slots=4, max_cache_len=64, page_size=8)


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return ckpt.load(hf_checkpoint.path, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def engine(loaded):
    engine = PagedEngine(loaded.weights, loaded.cfg, CONFIG)
    engine.warmup(progress=False)
    return engine


def new_driver(engine, tokenizer):
    return Driver(engine, tokenizer)


def run_alone(engine, tokenizer, request: Request):
    return new_driver(engine, tokenizer).generate([request])[0]


def random_prompt(rng, vocab, lo=1, hi=30):
    return [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))]


def test_engine_api_prefill_insert_generate_matches_full_forward(engine, loaded):
    """The JetStream-shaped API by hand: two prompts into slots 3 and 1 and the pages a PagePool gives
    them (one more page each time a sequence crosses a page boundary), then decode steps."""
    cfg, w = loaded.cfg, loaded.weights
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8, 11, 12, 13, 14, 15, 16, 2, 4]]
    pages = PagePool(engine.page_layout, engine.max_concurrent_decodes)
    state = engine.init_decode_state()
    prefix = engine.prefill(prompts, SamplingParams.host([0, 0], [0, 0], [1, 1], [0, 0]))
    for slot, prompt in ((3, prompts[0]), (1, prompts[1])):
        assert pages.allocate(slot, len(prompt) + 1)
        pages.lengths[slot] = len(prompt)
    state = engine.insert(prefix, state, [3, 1], pages)
    seqs = {3: list(prompts[0]), 1: list(prompts[1])}
    firsts = np.asarray(prefix.tokens)
    seqs[3].append(int(firsts[0]))
    seqs[1].append(int(firsts[1]))
    for _ in range(12):  # slot 1 reaches 24 tokens: pages 1, 2 and 3
        for slot in (3, 1):
            assert pages.allocate(slot, int(pages.lengths[slot]) + 1)
        state, out = engine.generate(state, pages)
        for slot in (3, 1):
            pages.lengths[slot] += 1
            seqs[slot].append(int(out.tokens[slot]))
    assert len(pages.pages_of(1)) == 3 and len(pages.pages_of(3)) == 3
    for slot, prompt in ((3, prompts[0]), (1, prompts[1])):
        full = np.asarray(transformer.full_logits(w, cfg, np.array([seqs[slot]])))[0]
        expected = np.argmax(full[len(prompt) - 1 : -1, : cfg.real_vocab_size], axis=-1)
        assert seqs[slot][len(prompt):] == expected.tolist()
    assert engine.max_concurrent_decodes == 4 and engine.max_prefill_length == 32


def test_warmup_then_no_compilation_at_all(loaded, tokenizer):
    """A fresh engine (one prefill shape, to keep the test short): after warm-up, serving compiles
    nothing, and the engine's own counter says so."""
    engine = PagedEngine(loaded.weights, loaded.cfg, dataclasses.replace(CONFIG, prompt_buckets=(32,), batch_buckets=(4,)))
    assert engine.compilations_since_warmup is None
    engine.warmup(progress=False)
    Driver(engine, tokenizer).generate([Request([1] * n, 5, temperature=0.5, top_p=0.8, seed=n) for n in (3, 9, 20, 31)])
    assert engine.compilations_since_warmup == 0


def test_zero_recompiles_after_warmup(engine, loaded, tokenizer):
    assert engine.warmup_seconds is not None and engine.warmup_seconds > 0
    rng = random.Random(0)
    driver = new_driver(engine, tokenizer)
    before = compilation_count()  # process-wide: other tests compile their own reference passes
    for step in range(60):
        for _ in range(rng.choice([0, 0, 1, 3])):
            driver.submit(Request(
                prompt_ids=random_prompt(rng, loaded.cfg.vocab_size), max_tokens=rng.randint(1, 30),
                temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.choice([0, 1, 5, 200]),
                top_p=rng.choice([1.0, 0.9, 0.3]), seed=rng.randrange(1000),
                stop=rng.choice([(), ("a",)]),
            ), lambda out: None)
        driver.step()
    while driver.has_work():
        driver.step()
    driver.generate([Request([1, 2, 3], 4, temperature=0.7, seed=1)])  # alone and short: one page
    assert driver.stats["prefill_batches"] > 5 and driver.stats["decode_steps"] > 20
    assert set(engine.decode_steps_by_bucket) == set(engine.page_buckets) == {1, 2, 4, 8}
    assert compilation_count() - before == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_output_is_the_same_alone_and_among_joining_and_leaving_requests(engine, loaded, tokenizer, seed):
    rng = random.Random(seed)
    vocab = loaded.cfg.vocab_size
    target = Request(prompt_ids=random_prompt(rng, vocab, 3, 30), max_tokens=25)
    alone = run_alone(engine, tokenizer, target)

    driver = new_driver(engine, tokenizer)
    outputs = []
    others = []
    for _ in range(rng.randint(0, 3)):  # some requests are already running when the target arrives
        others.append(driver.submit(Request(random_prompt(rng, vocab), rng.randint(1, 30), temperature=1.0, seed=1),
                                    lambda o: None))
    for _ in range(rng.randint(0, 4)):
        driver.step()
    driver.submit(dataclasses.replace(target, request_id="target"), outputs.append)
    while driver.has_work():
        target_running = not (outputs and outputs[-1].finished)
        if target_running and rng.random() < 0.4:  # arrivals only while the target runs, so this ends
            others.append(driver.submit(Request(random_prompt(rng, vocab), rng.randint(1, 30)), lambda o: None))
        if others and rng.random() < 0.15:
            driver.cancel(rng.choice(others))
        driver.step()
    assert [t for o in outputs for t in o.token_ids] == alone.token_ids
    np.testing.assert_allclose([lp for o in outputs for lp in o.logprobs], alone.logprobs, atol=1e-5)


def test_seeded_sampling_is_reproducible_whatever_the_neighbours(engine, loaded, tokenizer):
    rng = random.Random(5)
    sampled = Request(prompt_ids=[4, 8, 15, 16, 23, 42], max_tokens=20, temperature=1.0, top_p=0.95, top_k=50, seed=123)
    alone = run_alone(engine, tokenizer, sampled)
    driver = new_driver(engine, tokenizer)
    crowd = [Request(random_prompt(rng, loaded.cfg.vocab_size), 20, temperature=1.0, seed=i) for i in range(3)]
    results = driver.generate(crowd[:2] + [dataclasses.replace(sampled)] + crowd[2:])
    assert results[2].token_ids == alone.token_ids
    other_seed = run_alone(engine, tokenizer, dataclasses.replace(sampled, seed=124))
    assert other_seed.token_ids != alone.token_ids  # the seed matters


def test_top_k_one_is_greedy(engine, tokenizer):
    greedy = run_alone(engine, tokenizer, Request([1, 2, 3], 15))
    top1 = run_alone(engine, tokenizer, Request([1, 2, 3], 15, temperature=1.5, top_k=1, seed=9))
    assert top1.token_ids == greedy.token_ids


def test_logprobs_are_the_models_own(engine, loaded, tokenizer):
    cfg, w = loaded.cfg, loaded.weights
    prompt = [7, 7, 100, 3]
    result = run_alone(engine, tokenizer, Request(prompt, 10, temperature=2.0, top_p=0.5, seed=3))
    full = np.asarray(transformer.full_logits(w, cfg, np.array([prompt + result.token_ids])))[0]
    logp = jax.nn.log_softmax(full[:, : cfg.real_vocab_size], axis=-1)
    expected = [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(result.token_ids)]
    np.testing.assert_allclose(result.logprobs, expected, atol=1e-4)


def test_max_tokens_stop_token_and_eos(engine, loaded, tokenizer):
    base = Request([10, 20, 30], 12)
    full = run_alone(engine, tokenizer, base)
    assert len(full.token_ids) == 12 and full.finish_reason == "length"

    stop_at = next(i for i in range(2, 12) if full.token_ids[i] not in full.token_ids[:i])
    stop_token = full.token_ids[stop_at]
    stopped = run_alone(engine, tokenizer, dataclasses.replace(base, stop_token_ids=[stop_token]))
    assert stopped.token_ids == full.token_ids[:stop_at] and stopped.finish_reason == "stop"

    eos_engine = PagedEngine(loaded.weights, dataclasses.replace(loaded.cfg, eos_token_id=stop_token), CONFIG)
    eos_driver = Driver(eos_engine, tokenizer)
    ignored, honoured = eos_driver.generate([dataclasses.replace(base, request_id="ignore-eos"),
                                             dataclasses.replace(base, request_id="stop-at-eos", stop_at_eos=True)])
    assert ignored.token_ids == full.token_ids
    assert honoured.token_ids == full.token_ids[:stop_at] and honoured.finish_reason == "stop"


def test_padding_vocabulary_rows_are_never_sampled(tokenizer):
    """A GPT-J-sized vocabulary (50400 rows): even when the padding rows have the largest logits,
    neither greedy nor sampling ever picks one of them."""
    from model.nn.config import preset

    cfg = preset("tiny")
    loaded = ckpt.load("tiny", progress=False)
    bias = loaded.weights.lm_head_bias.at[cfg.real_vocab_size :].set(1e4)
    weights = loaded.weights.replace(lm_head_bias=bias)
    engine = PagedEngine(weights, cfg, EngineConfig(prompt_buckets=(8,), batch_buckets=(2,), slots=4, max_cache_len=32))
    # Extreme temperatures included: a tiny one once overflowed the scaled logits, a huge one
    # (a subnormal reciprocal) turned the padding rows' -inf into NaN, which argmax picked.
    results = Driver(engine, tokenizer).generate([
        Request([1, 2], 10), Request([3, 4], 10, temperature=5.0, seed=1),
        Request([1, 2], 10, temperature=1e-45, seed=2), Request([3, 4], 10, temperature=3e38, seed=3),
    ])
    assert results[2].token_ids == results[0].token_ids  # a vanishing temperature is greedy
    for r in results:
        assert len(r.token_ids) == 10
        assert all(t < cfg.real_vocab_size for t in r.token_ids)


def test_config_validation_names_the_problem(loaded):
    with pytest.raises(ValueError, match="largest batch bucket 8 exceeds slots=4"):
        PagedEngine(loaded.weights, loaded.cfg, EngineConfig(prompt_buckets=(8,), batch_buckets=(1, 8), slots=4))
    with pytest.raises(ValueError, match="largest prompt bucket 512 exceeds max_cache_len=64"):
        PagedEngine(loaded.weights, loaded.cfg, EngineConfig(prompt_buckets=(512,), slots=4, batch_buckets=(1,),
                                                             max_cache_len=64))
    with pytest.raises(ValueError, match=r"page_buckets=\(1, 2\) must .* end at the 8 pages"):
        PagedEngine(loaded.weights, loaded.cfg, dataclasses.replace(CONFIG, page_buckets=(1, 2)))
    with pytest.raises(ValueError, match="attention must be one of"):
        PagedEngine(loaded.weights, loaded.cfg, dataclasses.replace(CONFIG, attention="flash"))


def test_limits_pages_and_buckets(engine, loaded):
    from model.serving.request import Limits

    assert engine.limits == Limits(loaded.cfg.real_vocab_size, (8, 16, 32), 64, kv_capacity_tokens=32 * 8, max_beams=4,
                                   kv_page_size=8)
    assert engine.max_prefill_batch == 4 and engine.top_candidates == 9
    # On CPU the pool is the dense equivalent (no device memory to size it from): it never runs out,
    # so nothing is ever recomputed and prefill takes the prompt buckets only.
    assert (engine.page_layout.page_size, engine.page_layout.num_pages, engine.page_layout.pages_per_seq) == (8, 32, 8)
    assert engine.prefill_buckets == (8, 16, 32) and engine.page_buckets == (1, 2, 4, 8)
    assert engine.attention_impl == "reference"
    with pytest.raises(NotImplementedError, match=r"continuing a prefix needs prefill_chunk_tokens \(chunked prefill\)"):
        engine.prefill([[1, 2]], SamplingParams.host([0], [0], [1], [0]),
                       existing_prefix=PoolPrefix(engine.init_decode_state(), PagePool(engine.page_layout, 4), 0, 8))


@pytest.fixture(scope="module")
def small_pool_engine(loaded):
    """Room for 12 pages (96 tokens) among 4 slots: requests of up to 64 tokens preempt each other."""
    engine = PagedEngine(loaded.weights, loaded.cfg,
                         dataclasses.replace(CONFIG, num_pages=12, prompt_buckets=(32,), batch_buckets=(1, 4)))
    engine.warmup(progress=False)
    return engine


def test_preempted_requests_finish_exactly_as_unpreempted_runs(engine, small_pool_engine, loaded, tokenizer):
    # A recompute (prompt + up to 29 generated tokens) can pass the prompt buckets: one of 64 is added.
    assert small_pool_engine.prefill_buckets == (32, 64)
    rng = random.Random(7)
    vocab = loaded.cfg.vocab_size
    requests = [Request(random_prompt(rng, vocab, 10, 30), max_tokens=30, request_id=f"greedy-{i}") for i in range(4)]
    requests += [Request(random_prompt(rng, vocab, 10, 30), max_tokens=30, temperature=1.0, top_p=0.9, seed=i,
                         request_id=f"sampled-{i}") for i in range(2)]
    driver = Driver(small_pool_engine, tokenizer)
    crowded = driver.generate(requests)
    assert driver.stats["preemptions"] > 0
    assert small_pool_engine.compilations_since_warmup == 0
    for request, result in zip(requests, crowded):
        alone = run_alone(engine, tokenizer, request)
        assert result.token_ids == alone.token_ids, request.request_id
        np.testing.assert_allclose(result.logprobs, alone.logprobs, atol=1e-4)
    assert driver.kv_usage() == {"kv_pages_total": 12, "kv_pages_used": 0, "kv_pages_free": 12,
                                 "kv_cache_usage_perc": 0.0, "kv_pages_cached": 0}


def test_pool_smaller_than_a_context_refuses_what_can_never_fit(loaded, tokenizer):
    from model.serving.request import RequestRejected

    engine = PagedEngine(loaded.weights, loaded.cfg, dataclasses.replace(CONFIG, num_pages=4))  # 32 tokens
    driver = Driver(engine, tokenizer)
    with pytest.raises(RequestRejected, match=r"prompt \(20 tokens\) \+ max_tokens \(20\) = 40 tokens can never fit "
                                              r"the KV cache, which holds 32 tokens in all"):
        driver.submit(Request([1] * 20, 20), lambda o: None)
    assert driver.waiting == 0
    assert len(driver.generate([Request([1] * 20, 12)])[0].token_ids) == 12


def test_four_device_mesh_equals_one_device(loaded, hf_checkpoint, tokenizer):
    on_mesh = ckpt.load(hf_checkpoint.path, mesh=sharding.make_mesh(4), progress=False)
    requests = [Request([5, 9, 2, 7, 1] * 3, 20, request_id="a"), Request([3, 1, 4], 20, temperature=1.0, seed=3,
                                                                          request_id="b")]
    one = Driver(PagedEngine(loaded.weights, loaded.cfg, CONFIG), tokenizer).generate(requests)
    four = Driver(PagedEngine(on_mesh.weights, on_mesh.cfg, CONFIG, sharding.make_mesh(4)), tokenizer).generate(requests)
    for a, b in zip(one, four):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)


@pytest.fixture(scope="module")
def chunking_engine(loaded):
    """Prompts over 16 tokens are prefilled 16 at a time (prefill buckets 8 and 16)."""
    engine = PagedEngine(loaded.weights, loaded.cfg, dataclasses.replace(CONFIG, prefill_chunk_tokens=16))
    engine.warmup(progress=False)
    return engine


def test_chunked_prefill_changes_no_output_and_compiles_nothing_after_warmup(engine, chunking_engine, loaded,
                                                                            tokenizer):
    assert chunking_engine.prefill_buckets == (8, 16)
    rng = random.Random(11)
    vocab = loaded.cfg.vocab_size
    requests = [Request(random_prompt(rng, vocab, 17, 32), 20, request_id=f"long-{i}") for i in range(3)]
    requests += [Request(random_prompt(rng, vocab, 1, 16), 20, temperature=1.0, seed=i, request_id=f"short-{i}")
                 for i in range(3)]
    driver = Driver(chunking_engine, tokenizer)
    results = driver.generate(requests)
    assert driver.stats["prefill_chunks"] >= 6 and chunking_engine.compilations_since_warmup == 0
    for request, result in zip(requests, results):
        whole = run_alone(engine, tokenizer, request)
        assert result.token_ids == whole.token_ids, request.request_id
        np.testing.assert_allclose(result.logprobs, whole.logprobs, atol=1e-5)


def test_cancelling_mid_prefill_frees_the_slot_and_its_pages(chunking_engine, tokenizer):
    driver = Driver(chunking_engine, tokenizer)
    outputs = []
    driver.submit(Request(list(range(1, 33)), 10, request_id="long"), outputs.append)
    driver.step()  # its first chunk
    assert driver.kv_usage()["kv_pages_used"] == 5 and driver.stats["prefill_chunks"] == 1  # 32 + 1 tokens
    driver.cancel("long")
    driver.step()
    assert outputs[-1].finish_reason == "cancelled" and outputs[-1].token_ids == []
    assert driver.kv_usage()["kv_pages_used"] == 0 and driver.active_slots == 0 and not driver.has_work()


@pytest.fixture(scope="module")
def caching_engine(loaded):
    """Prefix caching over 8-token pages; what follows a cached prefix is prefilled 16 tokens at a time.
    A pool of 12 pages (fewer than 4 full contexts): cached pages are evicted under pressure."""
    engine = PagedEngine(loaded.weights, loaded.cfg, dataclasses.replace(
        CONFIG, prefill_chunk_tokens=16, enable_prefix_caching=True, num_pages=12))
    engine.warmup(progress=False)
    return engine


def test_prefix_caching_reuses_pages_and_changes_no_output(engine, caching_engine, loaded, tokenizer):
    rng = random.Random(3)
    vocab = loaded.cfg.vocab_size
    shared = random_prompt(rng, vocab, 24, 24)  # three full pages
    requests = [Request(shared + random_prompt(rng, vocab, 1, 6), 12, temperature=t, seed=i, request_id=f"r{i}")
                for i, t in enumerate([0.0, 0.0, 1.0, 0.0])]
    others = [Request(random_prompt(rng, vocab, 20, 30), 12, request_id=f"other{i}") for i in range(4)]
    driver = Driver(caching_engine, tokenizer)
    first = driver.generate(requests[:1])  # caches the shared pages
    rest = driver.generate(requests[1:] + others)  # the others' pages push cached ones out of 12
    assert driver.stats["prefix_cache_hits"] >= 3 * 24 and caching_engine.compilations_since_warmup == 0
    prompt_tokens = sum(len(r.prompt_ids) for r in requests + others)  # and recomputes' tokens, when preempted
    queries = driver.stats["prefix_cache_queries"]
    assert queries >= prompt_tokens and (queries == prompt_tokens) == (driver.stats["preemptions"] == 0)
    for request, result in zip(requests + others, first + rest):
        alone = run_alone(engine, tokenizer, request)
        assert result.token_ids == alone.token_ids, request.request_id
        np.testing.assert_allclose(result.logprobs, alone.logprobs, atol=1e-5)
    usage = driver.kv_usage()
    assert usage["kv_pages_used"] == 0 and usage["kv_pages_free"] == 12 and 0 < usage["kv_pages_cached"] <= 12
