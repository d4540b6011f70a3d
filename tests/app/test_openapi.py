"""app.openapi, without Ray: the document the ingress publishes for its args."""

import inspect
import re

import pytest

from app.args import AppArgs
from app.ingress import Ingress, api
from app.openapi import ERRORS, PARSED_BODIES, PROTECTED, openapi_document

PLAIN = AppArgs(model_name="gptj-test")
KEYED = AppArgs(model_name="gptj-test", api_key_env="GPTJ_TEST_KEY")


def refs(node) -> set[str]:
    if isinstance(node, dict):
        return {v for k, v in node.items() if k == "$ref"} | set().union(*(refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(refs(v) for v in node))
    return set()


def test_the_routes_and_their_bodies():
    doc = openapi_document(api, PLAIN)
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/v1/completions", "/v1/models", "/v1/models/{model_id}", "/generate", "/tokenize",
                                 "/detokenize", "/healthz", "/health", "/readyz", "/v1/stats"}
    for path, model in PARSED_BODIES.items():
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model.__name__}"}
        name = doc["components"]["schemas"][model.__name__]["properties"]["model"]
        assert name.get("enum", name.get("anyOf", [{}])[0].get("enum")) == ["gptj-test"]
    names = {f"#/components/schemas/{name}" for name in doc["components"]["schemas"]}
    assert refs(doc) and refs(doc) <= names, sorted(refs(doc) - names)


def test_every_error_status_is_documented():
    doc = openapi_document(api, PLAIN)
    for path in PARSED_BODIES:
        responses = doc["paths"][path]["post"]["responses"]
        assert {str(s) for s in ERRORS} <= set(responses)
        assert "Retry-After" in responses["503"]["headers"]
        assert responses["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    streamed = doc["paths"]["/v1/completions"]["post"]["responses"]["200"]["content"]
    assert set(streamed) == {"application/json", "text/event-stream"}
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]


@pytest.mark.parametrize("args", [PLAIN, KEYED], ids=["no key", "key"])
def test_the_bearer_scheme_only_when_a_key_is_required(args):
    doc = openapi_document(api, args)
    keyed = args.api_key_env is not None
    assert ("securitySchemes" in doc["components"]) == keyed
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            protected = PROTECTED.get(path) == method
            assert ("401" in operation["responses"]) == (keyed and protected), (path, method)
            assert ("security" in operation) == (keyed and protected), (path, method)


def test_documents_do_not_leak_into_each_other():
    keyed = openapi_document(api, KEYED)
    plain = openapi_document(api, AppArgs(model_name="other"))
    assert "401" not in plain["paths"]["/v1/stats"]["get"]["responses"]
    assert plain["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["other"]
    assert keyed["components"]["schemas"]["CompletionRequest"]["properties"]["model"]["enum"] == ["gptj-test"]


def test_protected_routes_are_the_ones_that_check_the_key():
    """PROTECTED documents what the routes do: a route checks the key exactly when it is listed. (A
    route's operationId is FastAPI's `<function name><path, non-word characters as _>_<method>`.)"""
    doc = openapi_document(api, PLAIN)
    cls = Ingress.func_or_class  # Serve's ingress wrapper, a subclass of the class defined in app.ingress
    routes = {name: getattr(cls, name) for name in dir(cls)}
    checked = set()
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            suffix = re.sub(r"\W", "_", path) + "_" + method
            [name] = [n for n in routes if operation["operationId"] == n + suffix]
            if "self._screen(http" in inspect.getsource(routes[name]):  # _screen checks the key
                checked.add((path, method))
    assert checked == set(PROTECTED.items())
