"""Limits, the one validator every layer shares: messages name the field, and nothing needs JAX."""

import copy
import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from model.nn.config import GPT2_VOCAB_SIZE
from model.serving.request import Limits, Request, RequestRejected

LIMITS = Limits(vocab_size=GPT2_VOCAB_SIZE, prompt_buckets=(16, 64), max_total_length=256)


def test_prompt_checks_name_the_callers_fields():
    with pytest.raises(RequestRejected, match=r"^query has 65 tokens; the longest prompt served is 64$") as e:
        LIMITS.check_prompt([1] * 65, 4, param="query")
    assert e.value.param == "query"
    with pytest.raises(RequestRejected, match=r"extra_inputs.per_example_max_decode_steps \(250\) = 260") as e:
        LIMITS.check_prompt([1] * 10, 250, "query", "extra_inputs.per_example_max_decode_steps")
    assert e.value.param == "extra_inputs"


def test_a_request_the_kv_pool_could_never_hold_is_refused_naming_max_tokens():
    small_pool = dataclasses.replace(LIMITS, kv_capacity_tokens=100)
    small_pool.check(Request([1] * 60, 40))  # exactly the pool
    with pytest.raises(RequestRejected, match=r"prompt \(60 tokens\) \+ max_tokens \(41\) = 101 tokens can never "
                                              r"fit the KV cache, which holds 100 tokens in all") as e:
        small_pool.check(Request([1] * 60, 41))
    assert e.value.param == "max_tokens"
    LIMITS.check(Request([1] * 60, 196))  # no pool limit: only the context's


def test_numpy_integers_are_token_ids_and_floats_are_not():
    LIMITS.check(Request(np.array([1, 2], np.int64).tolist() + [np.int32(3)], 4))
    with pytest.raises(RequestRejected, match="token id 1.5 is outside"):
        LIMITS.check(Request([1, 1.5], 4))


def test_prompt_bucket_is_the_smallest_that_holds_the_prompt():
    assert [LIMITS.prompt_bucket(n) for n in (1, 16, 17, 64)] == [16, 16, 64, 64]


def test_request_rejected_keeps_its_field_when_rebuilt_from_its_reduce():
    """Ray pickles exceptions (deepcopy takes the same path); `param` must survive it."""
    e = copy.deepcopy(RequestRejected("bad top_p", "top_p"))
    assert str(e) == "bad top_p" and e.param == "top_p"


def test_requests_are_frozen():
    with pytest.raises(AttributeError):
        Request([1], 2).max_tokens = 3


def test_the_request_module_imports_no_jax():
    code = "import sys, model.serving.request; assert 'jax' not in sys.modules and 'numpy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
