"""What real clients send, against the served app over HTTP and through the official openai client:
prompt logprobs and top logprobs equal transformers' log-softmax, penalties and min_tokens reach the
engine, vLLM's /tokenize and /detokenize, /health, models.retrieve, null fields, streamed usage."""

import httpx
import numpy as np
import openai
import pytest

from model.text.tokenizer import Tokenizer
from tests.cluster import MODEL_NAME, sse_payloads

PROMPT = "The quick brown fox jumps over the lazy dog"
EOS = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def openai_client(serve_app):
    return openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key="unused", max_retries=0)


def reference_logprobs(serve_app, ids):
    """transformers' log-softmax over the real vocabulary at every position of `ids`."""
    logits = serve_app.checkpoint.torch_logits([ids])[0, :, : serve_app.checkpoint.cfg.real_vocab_size]
    logits = logits.astype(np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)


def test_echo_logprobs_through_the_openai_client_equal_transformers(openai_client, serve_app, tokenizer):
    ids = tokenizer.encode(PROMPT)
    completion = openai_client.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=5,
                                                  max_tokens=2, temperature=0)
    [choice] = completion.choices
    lp = choice.logprobs
    generated = lp.tokens[len(ids):]
    assert len(generated) == 2 and lp.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert choice.text == PROMPT + "".join(generated)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    new_ids = [tokenizer.encode(t)[0] for t in generated]  # one token each (a random model's ASCII picks)
    logp = reference_logprobs(serve_app, ids + new_ids)
    expected = [logp[i - 1, t] for i, t in enumerate(ids + new_ids) if i]
    np.testing.assert_allclose(lp.token_logprobs[1:], expected, atol=1e-4)
    for i, top in enumerate(lp.top_logprobs[1:], start=1):
        best = np.argsort(-logp[i - 1])[:5]
        want = {}
        for t in best:
            want.setdefault(tokenizer.decode([int(t)]), logp[i - 1, t])
        want.setdefault(lp.tokens[i], logp[i - 1, (ids + new_ids)[i]])  # the chosen token, even outside the top 5
        assert set(top) == set(want), i
        np.testing.assert_allclose([top[k] for k in want], list(want.values()), atol=1e-4)
    assert completion.usage.prompt_tokens == len(ids) and completion.usage.completion_tokens == 2


def test_max_tokens_zero_with_echo_scores_the_prompt_only(client, serve_app, tokenizer):
    """lm-evaluation-harness's loglikelihood request, token-id prompts in a batch."""
    prompts = [tokenizer.encode(PROMPT), tokenizer.encode("Hello world, and")]
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompts, "max_tokens": 0, "echo": True,
                                             "logprobs": 1, "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    for ids, choice in zip(prompts, r.json()["choices"]):
        assert choice["finish_reason"] == "length" and choice["text"] == tokenizer.decode(ids)
        scores = choice["logprobs"]["token_logprobs"]
        logp = reference_logprobs(serve_app, ids)
        np.testing.assert_allclose(scores[1:], [logp[i - 1, t] for i, t in enumerate(ids) if i], atol=1e-4)
    assert r.json()["usage"]["completion_tokens"] == 0


def test_top_logprobs_of_generated_tokens_streamed_and_not(client):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 3,
            "ignore_eos": True}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        events = [e for e in sse_payloads(r.iter_lines()) if e != "[DONE]"]
    streamed = {k: sum((e["choices"][0]["logprobs"][k] for e in events), []) for k in plain}
    assert streamed["tokens"] == plain["tokens"] and streamed["top_logprobs"] == plain["top_logprobs"]
    for token, score, top in zip(plain["tokens"], plain["token_logprobs"], plain["top_logprobs"]):
        assert 3 <= len(top) <= 4 and top[token] == score  # greedy: the chosen token is the best
        assert max(top.values()) == score


def test_min_tokens_holds_against_a_boosted_eos_and_penalties_change_the_output(client):
    base = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    boosted = {**base, "logit_bias": {str(EOS): 100}}
    ended = client.post("/v1/completions", json=boosted).json()["choices"][0]
    assert ended["text"] == "" and ended["finish_reason"] == "stop"
    held = client.post("/v1/completions", json={**boosted, "min_tokens": 4, "return_token_ids": True}).json()
    choice = held["choices"][0]
    assert len(choice["token_ids"]) == 4 and choice["finish_reason"] == "stop"
    plain = client.post("/v1/completions", json={**base, "ignore_eos": True}).json()["choices"][0]["text"]
    # (this random model repeats nothing in 10 greedy tokens: negative penalties make it repeat)
    for penalty in ({"presence_penalty": -2.0}, {"frequency_penalty": -2.0}, {"repetition_penalty": 0.1}):
        changed = client.post("/v1/completions", json={**base, "ignore_eos": True, **penalty}).json()
        assert changed["choices"][0]["text"] != plain, penalty


def test_best_of_returns_the_best_candidates(client):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 1.0, "seed": 7, "n": 2,
            "best_of": 4, "logprobs": 0, "ignore_eos": True}
    r = client.post("/v1/completions", json=body).json()
    sums = [sum(c["logprobs"]["token_logprobs"]) for c in r["choices"]]
    assert len(sums) == 2 and r["usage"]["completion_tokens"] == 16  # every candidate counts
    singles = [client.post("/v1/completions", json={**body, "n": 1, "best_of": 1, "seed": 7 + j}).json()
               for j in range(4)]
    candidates = sorted((sum(s["choices"][0]["logprobs"]["token_logprobs"]) for s in singles), reverse=True)
    np.testing.assert_allclose(sums, candidates[:2], atol=1e-5)


def test_use_beam_search_returns_transformers_beams(client, serve_app, tokenizer):
    import torch

    ids = tokenizer.encode(PROMPT)
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 5, "temperature": 0,
                                             "use_beam_search": True, "best_of": 3, "n": 2, "return_token_ids": True})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        hf = serve_app.checkpoint.torch_model.generate(
            torch.tensor([ids]), max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False,
            early_stopping=True, length_penalty=1.0, pad_token_id=EOS, attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    expected = [[t for t in row[len(ids):].tolist() if t != EOS] for row in hf]
    assert [c["token_ids"] for c in r.json()["choices"]] == expected


def test_tokenize_detokenize_health_and_models_retrieve(client, openai_client, serve_app, tokenizer):
    r = client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False, "return_token_strs": True})
    assert r.json() == {"count": 2, "max_model_len": 256, "tokens": [15496, 995], "token_strs": ["Hello", "Ġworld"]}
    assert client.post("/detokenize", json={"model": MODEL_NAME, "tokens": [15496, 995]}).json() == {
        "prompt": "Hello world"}
    bad = client.post("/detokenize", json={"tokens": [50257]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert client.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 400
    for path in ("/health", "/healthz", "/readyz"):
        assert client.get(path).status_code == 200 and client.head(path).status_code == 200
    assert openai_client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("gpt-4")


def test_nulls_and_what_vllm_clients_send(client):
    nulls = {k: None for k in ("temperature", "top_p", "n", "echo", "stop", "presence_penalty", "frequency_penalty",
                               "logit_bias", "best_of", "logprobs", "seed", "user")}
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, **nulls})
    assert r.status_code == 200, r.text
    # guidellm's streamed request: continuous usage, stop null, ignore_eos, top_k -1
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "stream": True, "stop": None, "ignore_eos": True,
            "top_k": -1, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = [e for e in sse_payloads(r.iter_lines()) if e != "[DONE]"]
    assert all(e["usage"] is not None for e in events)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 6
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[0] >= 1
