"""Property-based fuzzing of the live shared app from its own OpenAPI schema (schemathesis).

For every operation in /openapi.json, schemathesis generates requests that fit the schema
("positive") and requests that break it ("negative": wrong types, missing fields, out-of-range
values), sends them over HTTP, and checks every answer: no 5xx, no hang (each call has a timeout),
a status the schema documents, the documented content type and headers (Retry-After on 503), a body
that matches the documented schema, and a 4xx for every request the schema says is invalid. One check
is left out on purpose: `positive_data_acceptance` (a request the schema allows must succeed) cannot
hold, because the schema cannot know every limit (token ids beyond the vocabulary and prompts longer
than the longest bucket get 400 by design). And for POST /generate the response body is not checked
here: Saxml's `[text, score]` pairs are a tuple, `prefixItems` in OpenAPI 3.1, which schemathesis 4.32
rewrites into draft-4 `items` and then rejects as an invalid schema; test_hostile_inputs.py checks
that response against the published schema with a Draft 2020-12 validator instead.

Each operation gets its own Hypothesis run per mode (schemathesis's pytest plugin is not used: it
relies on pytest internals that pytest 9 changed). The CI run is short (EXAMPLES per operation and
mode, derandomized so it is repeatable, well under a minute on a 2-core CPU); the `slow` run draws
many more, randomly:  pytest -m slow tests/reliability/test_fuzz.py
"""

from __future__ import annotations

import time

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance, response_schema_conformance

from tests.cluster import wait_until_idle
from tests.reliability.helpers import figures

EXAMPLES = 40
EXAMPLES_SLOW = 500
CALL_TIMEOUT_S = 60  # a hang fails the example with a timeout


@pytest.fixture(scope="module")
def api_schema(serve_app):
    wait_until_idle(serve_app.url)
    return schemathesis.openapi.from_url(f"{serve_app.url}/openapi.json")


def fuzz(api_schema, url: str, examples: int, derandomize: bool) -> dict[str, int]:
    """Every operation, both modes; returns how many requests each operation got."""
    sent: dict[str, int] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=examples, deadline=None, derandomize=derandomize, database=None,
                      suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
            @given(case=operation.as_strategy(mode))
            def run(case):
                excluded = [positive_data_acceptance]
                if operation.label == "POST /generate":
                    excluded.append(response_schema_conformance)
                case.call_and_validate(base_url=url, timeout=CALL_TIMEOUT_S, excluded_checks=excluded)
                sent[operation.label] = sent.get(operation.label, 0) + 1

            try:
                run()
            except Unsatisfiable:  # nothing to break: an operation without parameters or body
                assert mode is GenerationMode.NEGATIVE and operation.method == "get", operation.label
    return sent


def test_fuzz_finds_no_server_error_and_no_hang(api_schema, serve_app):
    start = time.monotonic()
    sent = fuzz(api_schema, serve_app.url, EXAMPLES, derandomize=True)
    assert {"POST /v1/completions", "POST /generate", "GET /v1/models"} <= set(sent), sent
    assert sent["POST /v1/completions"] >= EXAMPLES
    s = wait_until_idle(serve_app.url)  # every generation the fuzzer started has ended
    assert s["compilations_since_warmup"] == 0
    figures("fuzz", requests=sent, seconds=round(time.monotonic() - start, 1))


@pytest.mark.slow
def test_fuzz_long(api_schema, serve_app):
    start = time.monotonic()
    sent = fuzz(api_schema, serve_app.url, EXAMPLES_SLOW, derandomize=False)
    assert wait_until_idle(serve_app.url)["compilations_since_warmup"] == 0
    figures("fuzz (slow)", requests=sent, seconds=round(time.monotonic() - start, 1))
