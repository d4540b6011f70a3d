"""Hostile inputs against the live shared app: each gets a 4xx that names the problem, the OpenAPI
schema the ingress publishes describes exactly what it accepts, and the server is healthy afterwards.

The table complements tests/app/test_http.py (ordinary mistakes: a wrong model, a bad field value)
with bodies built to break a parser or an engine: broken JSON, invalid UTF-8, NaN and infinities,
numbers past 64 bits, 30,000-deep nesting, a 10 MB body, a 10,000-element stop list, token ids out
of range. The last test proves nothing of it reached the engine loop: the same replica is still
there, its loop still steps, nothing is held and nothing was compiled.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import referencing.jsonschema
from ray import serve

from app.protocol import InvalidRequest
from tests.cluster import APP_NAME, MODEL_NAME, stats, wait_until_idle

PROMPT = "The quick brown fox"
BASE = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4}


def body(**changes) -> bytes:
    return json.dumps({**BASE, **changes}).encode()


def raw(text: str) -> bytes:
    """A body from JSON-ish text, `{base}` standing for the valid fields."""
    return text.replace("{base}", json.dumps(BASE)[1:-1]).encode()


TEN_MB = 10 * 2**20
NESTED = raw('{{base}, "stop": ' + "[" * 30_000 + "]" * 30_000 + "}")

# (id, path, body, status, words the message must contain (lower case), the field it names or None)
HOSTILE = [
    ("truncated JSON", "/v1/completions", raw('{{base}, "stop": ['), 400, ["not valid json"], None),
    ("empty body", "/v1/completions", b"", 400, ["not valid json"], None),
    ("JSON array", "/v1/completions", b"[1, 2, 3]", 422, ["object"], "body"),
    ("JSON null", "/v1/completions", b"null", 422, ["object"], "body"),
    ("invalid UTF-8", "/v1/completions", raw('{{base}, "user": "@"}').replace(b"@", b"\xff\xfe"), 400,
     ["not valid json", "unicode"], None),
    ("lone surrogate", "/v1/completions", raw('{"model": "' + MODEL_NAME + '", "prompt": "\\ud800"}'), 400,
     ["not valid json", "surrogate"], None),
    ("NaN temperature", "/v1/completions", raw('{{base}, "temperature": NaN}'), 422, ["finite"], "temperature"),
    ("infinite temperature", "/v1/completions", raw('{{base}, "temperature": Infinity}'), 422, ["finite"],
     "temperature"),
    ("overflowing float", "/v1/completions", raw('{{base}, "top_p": 1e999}'), 422, ["finite"], "top_p"),
    ("NaN top_p", "/v1/completions", raw('{{base}, "top_p": NaN}'), 422, ["finite"], "top_p"),
    ("huge temperature", "/v1/completions", body(temperature=1e308), 422, ["less than or equal"], "temperature"),
    ("huge max_tokens", "/v1/completions", body(max_tokens=10**30), 400, ["max_tokens"], "max_tokens"),
    ("huge seed", "/v1/completions", body(seed=10**30), 422, ["less than or equal"], "seed"),
    ("seed past int32", "/v1/completions", body(seed=2**31, temperature=1.0), 422, ["less than or equal"], "seed"),
    ("negative seed", "/v1/completions", body(seed=-1), 422, ["greater than or equal"], "seed"),
    ("huge top_k", "/v1/completions", body(top_k=2**40), 422, ["less than or equal"], "top_k"),
    ("huge n", "/v1/completions", body(n=10**30), 400, ["n must be"], "n"),
    ("huge logprobs", "/v1/completions", body(logprobs=10**30), 422, ["less than or equal"], "logprobs"),
    ("string for an int", "/v1/completions", body(max_tokens="10"), 422, ["valid integer"], "max_tokens"),
    ("float for an int", "/v1/completions", body(n=1.5), 422, ["valid integer"], "n"),
    ("string for a bool", "/v1/completions", body(stream="yes"), 422, ["valid boolean"], "stream"),
    ("object for the prompt", "/v1/completions", body(prompt={"text": "hi"}), 422, ["prompt"], "prompt"),
    ("number for the model", "/v1/completions", body(model=5), 422, ["valid string"], "model"),
    ("deep nesting", "/v1/completions", NESTED, 400, ["not valid json", "recursion"], None),
    ("10 MB body", "/v1/completions", b"{" + b" " * TEN_MB + b"}", 413, ["limit"], None),
    ("10,000 stop strings", "/v1/completions", body(stop=["x"] * 10_000), 400, ["at most 16 stop"], "stop"),
    ("10,000 non-string stops", "/v1/completions", body(stop=[1] * 10_000), 422, ["valid string"], "stop"),
    ("token id past the vocabulary", "/v1/completions", body(prompt=[50257]), 400, ["outside the vocabulary"],
     "prompt"),
    ("token id past 64 bits", "/v1/completions", body(prompt=[[1, 2**70]]), 400, ["outside the vocabulary"], "prompt"),
    ("negative token id", "/v1/completions", body(prompt=[-1]), 400, ["outside the vocabulary"], "prompt"),
    ("10,000 token ids", "/v1/completions", body(prompt=[1] * 10_000), 400, ["prompt has 10000 tokens"], "prompt"),
    ("more choices than the server holds", "/v1/completions", body(prompt=["a"] * 5, n=2), 400,
     ["10 completions; at most 8 per request"], "n"),
    ("Saxml: NaN temperature", "/generate",
     raw('{"model": "' + MODEL_NAME + '", "query": "hi", "extra_inputs": {"temperature": NaN}}'), 422, ["finite"],
     "extra_inputs"),
    ("Saxml: huge top_k", "/generate",
     json.dumps({"model": MODEL_NAME, "query": "hi", "extra_inputs": {"per_example_top_k": 2**40}}).encode(), 422,
     ["less than or equal"], "extra_inputs"),
    ("Saxml: query of the wrong type", "/generate", json.dumps({"model": MODEL_NAME, "query": ["hi"]}).encode(), 422,
     ["valid string"], "query"),
    ("Saxml: huge decode steps", "/generate",
     json.dumps({"model": MODEL_NAME, "query": "hi",
                 "extra_inputs": {"per_example_max_decode_steps": 10**30}}).encode(),
     400, ["per_example_max_decode_steps"], "extra_inputs"),
]


@pytest.fixture(scope="module")
def before(serve_app) -> dict:
    """The shared app's state before any hostile input (its replica, its counters)."""
    return wait_until_idle(serve_app.url)


@pytest.mark.parametrize("path,content,status,words,param", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_input_gets_a_4xx_naming_the_problem(client, before, path, content, status, words, param):
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    message = error["message"].lower()
    assert any(w in message for w in words), f"{error['message']!r} names none of {words}"
    assert error["param"] == param
    assert len(error["message"]) < 2000, "the message must stay readable, not echo the input"


def test_chunked_body_over_the_limit_is_cut_off(client, before):
    """No Content-Length to refuse up front: the ingress counts while it reads and stops at the limit."""

    def ten_megabytes():
        yield b'{"model": "' + MODEL_NAME.encode() + b'", "prompt": "'
        for _ in range(160):
            yield b"a" * 65536
        yield b'"}'

    r = client.post("/v1/completions", content=ten_megabytes(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]


def test_wrong_methods_and_unknown_paths(client, before):
    assert client.get("/v1/completions").status_code == 405
    assert client.post("/v1/models").status_code == 405
    assert client.post("/v1/nothing", json=BASE).status_code == 404


def test_hostile_input_through_the_python_handle(before):
    """The handle path validates the same way (a str that is not valid Unicode never reaches the tokenizer)."""
    handle = serve.get_app_handle(APP_NAME)
    cases = [({**BASE, "prompt": "\ud800"}, "prompt"), ({**BASE, "seed": 2**40}, "seed"),
             ({**BASE, "top_k": 2**40}, "top_k")]
    for request, param in cases:
        with pytest.raises(InvalidRequest) as e:
            handle.generate.remote(request).result()
        assert e.value.param == param, e.value.message


# -- the published OpenAPI schema -----------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi(client) -> dict:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()


def resolve(document: dict, schema: dict) -> dict:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_openapi_lists_every_route_with_its_body_and_errors(openapi):
    paths = openapi["paths"]
    assert {p: sorted(ops) for p, ops in paths.items()} == {
        "/v1/completions": ["post"], "/generate": ["post"], "/v1/models": ["get"], "/v1/models/{model_id}": ["get"],
        "/tokenize": ["post"], "/detokenize": ["post"], "/healthz": ["get"], "/health": ["get"], "/readyz": ["get"],
        "/v1/stats": ["get"],
    }
    for path, model in (("/v1/completions", "CompletionRequest"), ("/generate", "SaxmlGenerateRequest")):
        operation = paths[path]["post"]
        request_body = operation["requestBody"]
        assert request_body["required"] is True
        assert request_body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        responses = operation["responses"]
        assert {"200", "400", "413", "422", "500", "503"} <= set(responses), sorted(responses)
        for status in ("400", "413", "422", "500", "503"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "Retry-After" in responses["503"]["headers"]
    completions = paths["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(completions) == {"application/json", "text/event-stream"}
    assert "503" in paths["/readyz"]["get"]["responses"]
    assert "securitySchemes" not in openapi.get("components", {}), "no API key on the shared app"


def test_every_ref_in_the_openapi_document_resolves(openapi):
    def refs(node):
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    found = set(refs(openapi))
    assert "#/components/schemas/StreamOptions" in found and "#/components/schemas/SaxmlExtraInputs" in found
    for ref in found:
        resolve(openapi, {"$ref": ref})  # KeyError if dangling


def reject_constant(name: str):
    raise ValueError(f"{name} is not standard JSON")


def test_openapi_request_schema_matches_the_server(client, openapi):
    """What the server refuses with 422 the schema refuses too; what a client builds from the schema's
    valid forms, the server serves; a Saxml answer matches its schema (see test_fuzz.py for why here)."""
    registry = referencing.Registry().with_resource("urn:openapi", referencing.Resource.from_contents(
        openapi, default_specification=referencing.jsonschema.DRAFT202012))
    completions = jsonschema.Draft202012Validator({"$ref": "urn:openapi#/components/schemas/CompletionRequest"},
                                                  registry=registry)
    for name, path, content, status, _words, _param in HOSTILE:
        try:
            instance = json.loads(content, parse_constant=reject_constant)
        except (ValueError, RecursionError):
            continue  # not standard JSON (broken, not UTF-8, NaN, too deep): no schema can describe it
        if path == "/v1/completions" and status == 422:
            assert not completions.is_valid(instance), f"{name}: the schema accepts what the server refuses"
    valid = [
        {**BASE, "prompt": [464, 2068]}, {**BASE, "prompt": [[464], [2068, 318]], "n": 2},
        {**BASE, "prompt": ["a", "b"], "stop": "\n", "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 1},
        {**BASE, "logprobs": 1, "stream": False, "stream_options": None, "user": "u"},
    ]
    for request in valid:
        assert completions.is_valid(request), request
        r = client.post("/v1/completions", json=request)
        assert r.status_code == 200, r.text
    saxml = jsonschema.Draft202012Validator({"$ref": "urn:openapi#/components/schemas/SaxmlGenerateResponse"},
                                            registry=registry)
    r = client.post("/generate", json={"model": MODEL_NAME, "query": PROMPT})
    assert r.status_code == 200 and saxml.is_valid(r.json()), r.text
    assert not saxml.is_valid({"generate_response": [["text"]]})  # a pair, not a 1-tuple


# -- afterwards -----------------------------------------------------------------------------------


def test_the_server_is_healthy_afterwards(client, serve_app, before):
    """Runs last in this module: the same replica serves, its loop steps, nothing is held or compiled."""
    assert client.get("/readyz").status_code == 200
    r = client.post("/v1/completions", json={**BASE, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    after = wait_until_idle(serve_app.url)
    assert after["replica"] == before["replica"], "the replica was replaced: a hostile input crashed it"
    assert after["decode_steps"] > before["decode_steps"]
    assert after["compilations_since_warmup"] == 0
    assert stats(serve_app.url)["batcher"]["held"] == 0
