"""Serving behaviour through the real graph and real HTTP, on the lab app's mock engine
(tests/cluster.py): a prompt ending in token t streams t+1, t+2, ... with logprob -(token % 4) / 4,
so what every route returns can be written out by hand, and any token lost, duplicated, reordered or
sent to the wrong request shows."""

import httpx
import pytest

from model.nn.config import GPT2_VOCAB_SIZE
from model.text.tokenizer import Tokenizer
from tests.cluster import MODEL_NAME, sse_payloads, wait_until_idle


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


def mock_logprob(token: int) -> float:
    return -(token % 4) / 4


def stream(url: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        events = list(sse_payloads(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return events[:-1]


def test_streamed_tokens_arrive_in_order_for_every_choice(lab_app, tokenizer):
    wait_until_idle(lab_app.url)
    body = {"model": MODEL_NAME, "prompt": [[100, 200], [7]], "n": 2, "max_tokens": 12, "logprobs": 0,
            "return_token_ids": True, "ignore_eos": True}
    events = stream(lab_app.url, body)
    per_choice: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            per_choice.setdefault(choice["index"], []).extend(choice["token_ids"])
            text[choice["index"]] = text.get(choice["index"], "") + choice["text"]
            assert choice["logprobs"]["token_logprobs"] == [mock_logprob(t) for t in choice["token_ids"]]
    expected = {0: list(range(201, 213)), 1: list(range(201, 213)), 2: list(range(8, 20)), 3: list(range(8, 20))}
    assert per_choice == expected
    assert all(text[i] == tokenizer.decode(expected[i]) for i in expected)


def test_eos_ends_a_completion_unless_ignored(lab_app):
    body = {"model": MODEL_NAME, "prompt": [50250], "max_tokens": 20, "return_token_ids": True}
    stopped = httpx.post(f"{lab_app.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert stopped["token_ids"] == [50251, 50252, 50253, 50254, 50255] and stopped["finish_reason"] == "stop"
    ignored = httpx.post(f"{lab_app.url}/v1/completions", json={**body, "max_tokens": 7, "ignore_eos": True},
                         timeout=60).json()["choices"][0]
    assert ignored["token_ids"] == [50251, 50252, 50253, 50254, 50255, 50256, 0]
    assert ignored["finish_reason"] == "length"


def test_stop_strings_cut_the_text_through_http(lab_app, tokenizer):
    assert tokenizer.decode(list(range(31, 39))) == "@ABCDEFG"
    body = {"model": MODEL_NAME, "prompt": [30], "max_tokens": 8, "stop": ["DE"]}
    events = stream(lab_app.url, body)
    assert "".join(c["text"] for e in events for c in e["choices"]) == "@ABC"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_saxml_score_is_the_sum_of_the_chosen_logprobs(lab_app, tokenizer):
    query = "The TPU v5e is"
    last = tokenizer.encode(query)[-1]
    body = {"model": MODEL_NAME, "query": query, "extra_inputs": {"per_example_max_decode_steps": 5}}
    [[text, score]] = httpx.post(f"{lab_app.url}/generate", json=body, timeout=60).json()["generate_response"]
    tokens = [(last + i) % GPT2_VOCAB_SIZE for i in range(1, 6)]
    assert text == tokenizer.decode(tokens)
    assert score == pytest.approx(sum(mock_logprob(t) for t in tokens))
    idle = wait_until_idle(lab_app.url)
    assert idle["compilations_since_warmup"] == 0
