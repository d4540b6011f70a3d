"""The ingress's OpenAPI 3.1 document, which FastAPI alone would get wrong in three ways.

- The request bodies: the routes read and parse their bodies themselves (to answer 413 before
  reading a huge body, and to shape their 422s), so FastAPI does not see them; `PARSED_BODIES` adds
  their schemas.
- The deployment's args: the one model name it accepts (an `enum` on `model`), and, when it requires
  an API key, the bearer scheme and the 401 on each route of `PROTECTED`.
- The errors and the event stream: `ERRORS` documents every error status with its body (and
  Retry-After on a 503); `SSE_EVENT` is one server-sent event of a streamed completion.

The ingress builds the document once, when it starts (`openapi_document`), and serves it at
/openapi.json; the document must refuse what the server refuses (tests/reliability checks both).
"""

from __future__ import annotations

import copy
import functools

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.args import AppArgs
from app.schemas import CompletionRequest, DetokenizeRequest, ErrorResponse, SaxmlGenerateRequest, TokenizeRequest

PARSED_BODIES = {"/v1/completions": CompletionRequest, "/generate": SaxmlGenerateRequest,
                 "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest}
# The routes that want the API key when one is required (app.ingress checks it), by method.
PROTECTED = {"/v1/completions": "post", "/generate": "post", "/v1/models": "get", "/v1/models/{model_id}": "get",
             "/tokenize": "post", "/detokenize": "post", "/v1/stats": "get"}


def error_doc(description: str) -> dict:
    """An error response of a route, for FastAPI's `responses=`: OpenAI's error body."""
    return {"model": ErrorResponse, "description": description}


ERRORS = {
    400: error_doc("The request cannot be served as asked (not JSON, an unknown model, a prompt the model cannot "
                   "take, a limit exceeded); `error.param` names the field."),
    408: error_doc("The body did not arrive within request_body_timeout_s, or the server gave up on a body still "
                   "arriving to admit another request; the connection is closed."),
    413: error_doc("The body is larger than the server's max_request_bytes."),
    415: error_doc("The body is not sent as Content-Type: application/json."),
    431: error_doc("Too many request headers, or too many bytes of them (max_header_count, max_header_bytes)."),
    422: error_doc("A field has the wrong type or value; `error.param` names it."),
    500: error_doc("The generation failed on the server."),
    503: {**error_doc("Not served now: the server is at capacity, or a deployment on the request's path failed. "
                      "Safe to retry after Retry-After seconds. (When even the queue in front of the ingress is "
                      "full, Serve answers this itself, in plain text.)"),
          "headers": {"Retry-After": {"description": "seconds to wait before retrying",
                                      "schema": {"type": "integer", "minimum": 1}}},
          "content": {"text/plain": {"schema": {"type": "string"}}}},
}
# One server-sent event of a streamed completion (`itemSchema`: the schema of each event, as FastAPI
# documents its own event streams).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a CompletionResponse chunk as JSON, an ErrorResponse as JSON if the "
                                              "generation fails after the stream began, or [DONE] at the end"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer", "minimum": 0},
}}
UNAUTHORIZED = {"description": "No valid API key: send `Authorization: Bearer <key>`.",
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}


@functools.cache
def _base_openapi(api: FastAPI) -> dict:
    """FastAPI's OpenAPI document for the routes of `api`, plus the request bodies that the routes parse
    themselves (so that they can answer 413 before reading a huge body, and shape 422s their own way)."""
    schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, model in PARSED_BODIES.items():
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[model.__name__] = body
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        schema["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": ref}}
        }
    return schema


def openapi_document(api: FastAPI, args: AppArgs) -> dict:
    """The OpenAPI document of the routes of `api` deployed with `args`: the one model name it accepts,
    and the bearer scheme (with its 401s) on the protected routes when it requires a key."""
    schema = copy.deepcopy(_base_openapi(api))
    components = schema["components"]
    for model in (CompletionRequest, SaxmlGenerateRequest):
        components["schemas"][model.__name__]["properties"]["model"]["enum"] = [args.model_name]
    logprobs = components["schemas"][CompletionRequest.__name__]["properties"]["logprobs"]["anyOf"][0]
    logprobs["maximum"] = args.max_top_logprobs  # the engine's (engine_options), which the ingress checks
    for model in (TokenizeRequest, DetokenizeRequest):  # optional there: a name or null
        components["schemas"][model.__name__]["properties"]["model"]["anyOf"][0]["enum"] = [args.model_name]
    if args.api_key_env is not None:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, method in PROTECTED.items():
            operation = schema["paths"][path][method]
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = UNAUTHORIZED
    return schema
