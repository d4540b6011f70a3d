"""The mock engine does exactly the arithmetic its docstring promises, through the engine API."""

import numpy as np
import pytest

from model.engine.api import PoolPrefix
from model.engine.mock import MockEngine, mock_logprob
from model.engine.sampling import SamplingParams
from model.serving.pages import PagePool

PARAMS = SamplingParams.host([0.0, 0.0], [0, 0], [1.0, 1.0], [0, 0])


def test_prefill_then_decode_counts_up_from_the_last_prompt_token():
    engine = MockEngine(slots=4)
    state = engine.init_decode_state()
    prefix = engine.prefill([[5, 9], [3, 50256]], PARAMS)
    assert prefix.tokens.tolist() == [10, 0]  # 50256 + 1 wraps around GPT-2's 50257 ids
    pages = PagePool(engine.page_layout, 4)
    state = engine.insert(prefix, state, [2, 0], pages)
    state, out = engine.generate(state, pages)
    assert out.tokens[[2, 0]].tolist() == [11, 1]
    state, out = engine.generate(state, pages)
    assert out.tokens[[2, 0]].tolist() == [12, 2]
    np.testing.assert_array_equal(out.logprobs, -(out.tokens % 4) / 4)


def test_logprobs_are_exact_quarters():
    assert mock_logprob(np.arange(6)).tolist() == [0.0, -0.25, -0.5, -0.75, 0.0, -0.25]


def test_a_chunk_continuing_a_prefix_generates_from_its_last_token():
    engine = MockEngine(prompt_buckets=(16, 64), prefill_chunk_tokens=32)
    pages = PagePool(engine.page_layout, 4)
    state = engine.init_decode_state()
    first = engine.prefill([list(range(32))], PARAMS)
    state = engine.insert(first, state, [0], pages)
    last = engine.prefill([[7, 8]], PARAMS, existing_prefix=PoolPrefix(state, pages, 0, 32))
    assert last.tokens.tolist() == [9] and engine.prefill_buckets == (16, 32)
    with pytest.raises(ValueError, match="one prompt of at most prefill_chunk_tokens=32"):
        engine.prefill([[1] * 33], PARAMS, existing_prefix=PoolPrefix(state, pages, 0, 32))


def test_limits_warmup_and_free_resource():
    engine = MockEngine(slots=3, prompt_buckets=(8, 32), max_prefill_batch=2, max_total_length=100)
    assert engine.limits.max_prompt_length == 32 and engine.max_total_length == 100
    layout = engine.page_layout  # by default every slot's longest sequence fits
    assert (layout.page_size, layout.num_pages, layout.pages_per_seq) == (16, 3 * 7, 7)
    assert engine.prefill_buckets == (8, 32)
    small_pool = MockEngine(slots=3, prompt_buckets=(8, 32), max_total_length=100, num_pages=5)
    assert small_pool.prefill_buckets == (8, 32, 100)  # it can preempt: a recompute may be the whole context
    assert engine.max_concurrent_decodes == 3 and engine.max_prefill_batch == 2
    assert engine.compilations_since_warmup is None
    engine.warmup()
    assert engine.compilations_since_warmup == 0
    engine.free_resource(1)
    assert engine.freed == [1]
    with pytest.raises(ValueError, match="prefill of 3 prompts"):
        engine.prefill([[1]] * 3, PARAMS)
