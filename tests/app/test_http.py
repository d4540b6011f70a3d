"""The HTTP API against the real Serve application: OpenAI completions (plain, streamed, through the
official client), Saxml /generate, health routes, the bad-input table, and greedy parity with the CLI."""

import json
import subprocess
import sys

import httpx
import openai
import pytest

from tests.cluster import MODEL_NAME, REPO_ROOT, sse_payloads, wait_until_idle

PROMPT = "The quick brown fox jumps over the lazy dog"


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, which must hold nothing but `data:` lines."""
    lines = list(response.iter_lines())
    unexpected = [line for line in lines if line and not line.startswith("data: ")]
    assert not unexpected, f"unexpected SSE lines {unexpected!r}"
    return list(sse_payloads(lines))


def test_health_and_models(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_completion_round_trip(client, serve_app):
    from model.text.tokenizer import Tokenizer

    body = complete(client, max_tokens=12, temperature=0, logprobs=0, return_token_ids=True, ignore_eos=True)
    assert body["object"] == "text_completion" and body["model"] == MODEL_NAME and body["id"].startswith("cmpl-")
    [choice] = body["choices"]
    tokenizer = Tokenizer.gpt2()
    assert choice["prompt_token_ids"] == tokenizer.encode(PROMPT)
    assert len(choice["token_ids"]) == 12 and choice["finish_reason"] == "length"
    assert choice["text"] == tokenizer.decode(choice["token_ids"])
    lp = choice["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in choice["token_ids"]]
    assert len(lp["token_logprobs"]) == 12 and all(x <= 0 for x in lp["token_logprobs"])
    assert lp["text_offset"][0] == 0  # logprobs 0: no alternatives, the chosen token itself
    assert lp["top_logprobs"] == [{t: x} for t, x in zip(lp["tokens"], lp["token_logprobs"])]
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}

    # A stop string cuts the text before it, with finish_reason "stop".
    stop = choice["text"][len(choice["text"]) // 2:][:3]
    stopped = complete(client, max_tokens=12, temperature=0, stop=[stop], ignore_eos=True)["choices"][0]
    assert stopped["finish_reason"] == "stop" and stopped["text"] == choice["text"][: choice["text"].index(stop)]

    # Echo puts the prompt in front; a seed makes sampling reproducible.
    echoed = complete(client, max_tokens=12, temperature=0, echo=True, ignore_eos=True)["choices"][0]
    assert echoed["text"] == PROMPT + choice["text"]
    seeded = [complete(client, max_tokens=8, temperature=1.0, seed=7)["choices"][0]["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_token_id_prompts_and_choices(client):
    body = complete(client, prompt=[[464, 2068], [262, 286, 290]], n=2, max_tokens=5, temperature=0, ignore_eos=True)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: both samples of a prompt agree
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 20


def test_streaming_matches_plain(client):
    plain = complete(client, max_tokens=16, temperature=0, ignore_eos=True)["choices"][0]["text"]
    request = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=request) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage_event, chunks = events[-2], events[:-2]
    assert usage_event["choices"] == [] and usage_event["usage"]["completion_tokens"] == 16
    assert "".join(e["choices"][0]["text"] for e in chunks) == plain
    assert 1 < len(chunks) < 16  # tokens travel in chunks, but not all at once
    assert [e["choices"][0]["finish_reason"] for e in chunks] == [None] * (len(chunks) - 1) + ["length"]


def test_openai_client(serve_app):
    client = openai.OpenAI(base_url=f"{serve_app.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    done = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 10
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    pieces = [c.choices[0].text for c in stream]
    assert len(pieces) > 1 and "".join(pieces) == done.choices[0].text
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)


def test_saxml_generate(client):
    r = client.post("/generate", json={"model": MODEL_NAME, "query": PROMPT,
                                       "extra_inputs": {"temperature": 0, "per_example_max_decode_steps": 8}})
    assert r.status_code == 200, r.text
    [[text, score]] = r.json()["generate_response"]
    reference = complete(client, max_tokens=8, temperature=0, logprobs=0)["choices"][0]
    assert text == reference["text"]
    assert score == pytest.approx(sum(reference["logprobs"]["token_logprobs"]), abs=1e-4)


def test_saxml_generate_beams(client, serve_app):
    """beam_size 3: every finished beam, best first, as Saxml answers; the best is transformers' beam
    search on the same weights (tokens, and its sequences_scores as the score)."""
    from bench.mlperf import Generation, Reference
    from model.ckpt import tokenizer_for

    extra = {"beam_size": 3, "per_example_max_decode_steps": 10, "per_example_min_decode_steps": 4,
             "length_penalty": 0.5}
    r = client.post("/generate", json={"model": MODEL_NAME, "query": PROMPT, "extra_inputs": extra})
    assert r.status_code == 200, r.text
    beams = r.json()["generate_response"]
    scores = [score for _, score in beams]
    assert len(beams) == 3 and scores == sorted(scores, reverse=True)
    tokenizer = tokenizer_for(serve_app.checkpoint.path)
    reference = Reference(serve_app.checkpoint.path, Generation(num_beams=3, min_new_tokens=4, length_penalty=0.5))
    expected = reference.generate(tokenizer.encode(PROMPT), 10)
    eos = reference.eos_token_id
    assert beams[0][0] == tokenizer.decode([t for t in expected["token_ids"] if t != eos])
    assert beams[0][1] == pytest.approx(expected["score"], abs=1e-4)
    s = wait_until_idle(serve_app.url)
    assert s["batcher"]["held"] == 0  # the three sequences it held are given back


def _prompt_ids(n: int) -> list[int]:
    return [262] * n


BAD_COMPLETIONS = [
    # (id, body changes, status, param)
    ("unknown model", {"model": "gpt-4"}, 400, "model"),
    ("empty prompt", {"prompt": ""}, 422, "prompt"),
    ("empty prompt list", {"prompt": []}, 422, "prompt"),
    ("empty token list", {"prompt": [[]]}, 422, "prompt"),
    ("mixed prompt list", {"prompt": [1, "a"]}, 422, "prompt"),
    ("prompt wrong type", {"prompt": 3}, 422, "prompt"),
    ("token id too large", {"prompt": [50400]}, 400, "prompt"),
    ("token id negative", {"prompt": [[5, -1]]}, 400, "prompt"),
    ("prompt over buckets", {"prompt": _prompt_ids(65)}, 400, "prompt"),
    ("over the context", {"prompt": _prompt_ids(60), "max_tokens": 200}, 400, "max_tokens"),
    ("max_tokens zero without echo", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", {"max_tokens": -5}, 422, "max_tokens"),
    ("max_tokens wrong type", {"max_tokens": "ten"}, 422, "max_tokens"),
    ("temperature negative", {"temperature": -0.1}, 422, "temperature"),
    ("top_p zero", {"top_p": 0}, 422, "top_p"),
    ("top_p above one", {"top_p": 1.5}, 422, "top_p"),
    ("top_k below -1", {"top_k": -2}, 422, "top_k"),
    ("top_k beyond int32", {"top_k": 2**40}, 422, "top_k"),
    ("seed beyond int32", {"seed": 2**40}, 422, "seed"),
    ("n zero", {"n": 0}, 422, "n"),
    ("n above max_n", {"n": 9}, 400, "n"),
    ("too many completions", {"prompt": ["a", "b", "c"], "n": 3}, 400, "n"),
    ("too many stops", {"stop": [str(i) for i in range(17)]}, 400, "stop"),
    ("unknown field", {"temprature": 0.5}, 422, "temprature"),
    ("penalty out of range", {"presence_penalty": 2.5}, 422, "presence_penalty"),
    ("repetition penalty zero", {"repetition_penalty": 0}, 422, "repetition_penalty"),
    ("logit_bias key not a token id", {"logit_bias": {"hello": 1}}, 422, "logit_bias"),
    ("logit_bias beyond the vocabulary", {"logit_bias": {"50400": 1}}, 400, "logit_bias"),
    ("logprobs above the maximum", {"logprobs": 6}, 400, "logprobs"),
    ("stream_options without stream", {"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("best_of below n", {"n": 2, "best_of": 1}, 400, "best_of"),
    ("min_tokens above max_tokens", {"min_tokens": 5}, 400, "min_tokens"),
    ("suffix", {"suffix": "x"}, 422, "suffix"),
]


@pytest.mark.parametrize("changes,status,param", [b[1:] for b in BAD_COMPLETIONS], ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_requests(client, changes, status, param):
    r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, **changes})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


BAD_SAXML = [
    ("unknown model", {"model": "/sax/test/other"}, 400, "model"),
    ("empty query", {"query": ""}, 422, "query"),
    ("top_p zero", {"extra_inputs": {"per_example_top_p": 0}}, 422, "extra_inputs"),
    ("negative steps", {"extra_inputs": {"per_example_max_decode_steps": -1}}, 422, "extra_inputs"),
    ("steps over the context", {"extra_inputs": {"per_example_max_decode_steps": 10**6}}, 400, "extra_inputs"),
    ("unknown extra input", {"extra_inputs": {"num_beams": 4}}, 422, "extra_inputs"),
    ("more beams than served", {"extra_inputs": {"beam_size": 5}}, 400, "extra_inputs"),
    ("beams with sampling", {"extra_inputs": {"beam_size": 2, "temperature": 0.7}}, 400, "extra_inputs"),
]


@pytest.mark.parametrize("changes,status,param", [b[1:] for b in BAD_SAXML], ids=[b[0] for b in BAD_SAXML])
def test_bad_saxml_requests(client, changes, status, param):
    r = client.post("/generate", json={"model": MODEL_NAME, "query": PROMPT, **changes})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_malformed_and_oversized_bodies(client, serve_app):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    big = json.dumps({"model": MODEL_NAME, "prompt": "x" * serve_app.args.max_request_bytes}).encode()
    r = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and str(serve_app.args.max_request_bytes) in r.json()["error"]["message"]


def test_greedy_matches_offline_cli(client, serve_app, tmp_path):
    """Same checkpoint, same prompts: the served greedy tokens equal `python -m model.generate`'s."""
    prompts = [PROMPT, "Hello world, this is a longer prompt that lands in the second bucket of the app."]
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    cli = subprocess.run(
        [sys.executable, "-m", "model.generate", "--checkpoint", serve_app.checkpoint.path,
         "--prompts-file", str(prompts_file), "--max-tokens", "20", "--json"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=True,
    )
    expected = [json.loads(line) for line in cli.stdout.splitlines()]
    body = complete(client, prompt=prompts, max_tokens=20, temperature=0, ignore_eos=True, return_token_ids=True)
    for want, got in zip(expected, body["choices"], strict=True):
        assert got["prompt_token_ids"] == want["prompt_ids"]
        assert got["token_ids"] == want["token_ids"]
        assert got["text"] == want["text"]


def test_openapi_documents_the_request_bodies(client):
    doc = client.get("/openapi.json").json()
    for path, model in (("/v1/completions", "CompletionRequest"), ("/generate", "SaxmlGenerateRequest")):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
    refs = set()

    def collect(node):
        if isinstance(node, dict):
            refs.update(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(doc)
    names = {f"#/components/schemas/{name}" for name in doc["components"]["schemas"]}
    assert refs and refs <= names, sorted(refs - names)
