"""The ingress: the HTTP API (FastAPI) and the Python handle API, in front of the batcher.

HTTP routes:
    POST /v1/completions   OpenAI completions; `stream: true` answers with server-sent events, one
                           event per chunk of tokens, ending with `data: [DONE]`
    GET  /v1/models        the one model, under `args.model_name`
    POST /generate         Saxml's HTTP shape: {"model", "query", "extra_inputs"} -> {"generate_response"}
    GET  /healthz          liveness: this process answers
    GET  /readyz           readiness: a model replica has loaded and warmed up (503 until then)
    GET  /v1/stats         the batcher's and every replica's counters (prefill batches, slots, ...)
    GET  /openapi.json     this API's OpenAPI document (and /docs, its Swagger UI)

API key. With `args.api_key_env` set, the ingress reads the key from that environment variable when
it starts (and refuses to start without one), and the model routes and /v1/stats answer 401 unless
the request carries `Authorization: Bearer <key>`. /healthz, /readyz, /openapi.json and /docs stay
open: probes and load balancers carry no key, and they reveal nothing but the API's shape. Python
handle calls need no key: they come from inside the Ray cluster, which has its own authentication.

Handle API (`serve.get_app_handle("gptj")`, from any Ray app or driver): `generate(request)` returns a
`CompletionResponse`; `generate_stream(request)` (call it with `.options(stream=True)`) yields
`CompletionChunk`s. Both take a `CompletionRequest` (or the same fields as a dict) and raise
`InvalidRequest` where HTTP would answer 4xx, and `Unavailable` where it would answer 503, meaning the
request may be sent again (`Overloaded` when the server is at capacity; otherwise a deployment on the
path failed).

A request's life here: check the API key (401), parse (413 over `max_request_bytes`, 422 naming the
field for a bad body; JSON is parsed strictly: "10" is not an integer, "yes" is not a boolean),
check the model name, tokenise and check every prompt against the replica's limits (400 naming the
field), then one streaming call to the batcher per choice. The response starts only when every choice
has its first chunk, so a refusal (503 with Retry-After) or a rejection is still an HTTP status, never
a broken stream. If the client disconnects, Serve cancels this request and, with it, the batcher calls
it made; the replica frees their slots at its next step. Tokenising and detokenising: prompts are
encoded here; the replica's driver detokenises incrementally and sends text with the token ids.

No `from __future__ import annotations` here: FastAPI must see the route parameters' real types.
"""

import asyncio
import copy
import functools
import hmac
import json
import os
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from app.args import AppArgs
from app.completions import CompletionAssembler, plan_completion, plan_saxml
from app.metrics import IngressMetrics
from app.protocol import (Chunk, EngineRequest, InvalidRequest, ModelInfo, NotReady, Overloaded, ServeError,
                          Unauthorized, Unavailable, describe, original)
from app.schemas import (
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorDetail,
    ErrorResponse,
    ModelCard,
    ModelList,
    SaxmlGenerateRequest,
    SaxmlGenerateResponse,
)
from model.text.tokenizer import Tokenizer

READY_TIMEOUT_S = 5.0

# The OpenAPI document depends on the deployment's args (the model's name, whether a key is required),
# so the ingress serves it from its own routes rather than FastAPI's.
api = FastAPI(title="GPT-J on Ray Serve", description="OpenAI completions and Saxml /generate for GPT-J.",
              openapi_url=None, docs_url=None, redoc_url=None)
PARSED_BODIES = {"/v1/completions": CompletionRequest, "/generate": SaxmlGenerateRequest}
PROTECTED = {"/v1/completions": "post", "/generate": "post", "/v1/models": "get", "/v1/stats": "get"}


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


ERRORS = {
    400: _error("The request cannot be served as asked (not JSON, an unknown model, a prompt the model cannot "
                "take, a limit exceeded); `error.param` names the field."),
    413: _error("The body is larger than the server's max_request_bytes."),
    422: _error("A field has the wrong type or value; `error.param` names it."),
    500: _error("The generation failed on the server."),
    503: {**_error("Not served now: the server is at capacity, or a deployment on the request's path failed. "
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
def _base_openapi() -> dict:
    """FastAPI's OpenAPI document for the routes, plus the request bodies that the routes parse
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


def openapi_document(args: AppArgs) -> dict:
    """The OpenAPI document of an ingress deployed with `args`: the one model name it accepts, and the
    bearer scheme (with its 401s) on the protected routes when it requires a key."""
    schema = copy.deepcopy(_base_openapi())
    components = schema["components"]
    for model in PARSED_BODIES.values():
        components["schemas"][model.__name__]["properties"]["model"]["enum"] = [args.model_name]
    if args.api_key_env is not None:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, method in PROTECTED.items():
            operation = schema["paths"][path][method]
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = UNAUTHORIZED
    return schema


def read_api_key(env_name: str | None) -> str | None:
    """The key clients must send, from the environment variable `env_name` (None: no key required).
    Raises when the variable is unset or blank: a server told to require a key never starts without one."""
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if key is None:
        raise RuntimeError(f"api_key_env={env_name!r}, but the environment variable {env_name} is not set (on GKE: "
                           "the gptj-api-key Secret, docs/GKE.md); set it, or leave api_key_env unset")
    if not key.strip():
        raise RuntimeError(f"api_key_env={env_name!r}, but the environment variable {env_name} is empty")
    return key.strip()


# ---------------------------------------------------------------------------------------------
# Errors


def as_serve_error(e: BaseException) -> ServeError:
    """Any failure of a call (a deployment's exception as Ray re-raised it, too) as the ServeError the
    client should see."""
    e = original(e)
    if isinstance(e, ServeError):
        return e
    if isinstance(e, BackPressureError):
        return Overloaded(f"the server is at capacity ({e}); retry later", e.retry_after_s or 1.0)
    if isinstance(e, RayActorError):  # the batcher replica serving the request died
        return Unavailable(f"the batcher serving this request failed ({describe(e)}); retry", 1.0)
    return ServeError(f"internal error: {describe(e)}")


def error_body(e: ServeError) -> dict:
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    if e.status_code == 401:
        kind = "authentication_error"
    detail = ErrorDetail(message=e.message, type=kind, param=getattr(e, "param", None), code=e.status_code)
    return ErrorResponse(error=detail).model_dump(mode="json")


def error_response(e: ServeError) -> JSONResponse:
    headers = {}
    if isinstance(e, Unavailable):
        headers["Retry-After"] = str(max(1, round(e.retry_after_s)))
    if isinstance(e, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(e), status_code=e.status_code, headers=headers)


@api.exception_handler(ServeError)
async def _on_serve_error(_request: Request, e: ServeError) -> JSONResponse:
    return error_response(as_serve_error(e))


def chunk_error(chunk: Chunk, retry_after_s: float) -> ServeError:
    if chunk.error_status == 503:
        kind = Overloaded if chunk.overloaded else Unavailable
        return kind(chunk.error or "unavailable", retry_after_s)
    if chunk.error_status < 500:
        return InvalidRequest(chunk.error or "rejected", "prompt", chunk.error_status)
    return ServeError(chunk.error or "generation failed")


async def read_body(http: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = http.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise InvalidRequest(f"request body is {declared} bytes; the limit is {limit}", None, 413)
    body = bytearray()
    async for part in http.stream():
        body += part
        if len(body) > limit:
            raise InvalidRequest(f"request body exceeds the limit of {limit} bytes", None, 413)
    return bytes(body)


def parse(model: type[BaseModel], body: bytes | dict | BaseModel):
    """Validate a JSON body (HTTP, strictly: no "10" for an integer) or a dict / model (handles);
    422 naming the fields, 400 for bad JSON."""
    try:
        return model.model_validate_json(body, strict=True) if isinstance(body, bytes) else model.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if errors[0]["type"] == "json_invalid":
            raise InvalidRequest(f"the body is not valid JSON: {errors[0]['msg']}", None, 400) from None
        fields = [".".join(str(p) for p in err["loc"]) or "body" for err in errors]
        message = "; ".join(f"{f}: {err['msg']}" for f, err in zip(fields, errors[:4]))
        raise InvalidRequest(message, fields[0].split(".")[0], 422) from None


# ---------------------------------------------------------------------------------------------
# The deployment


class _Timing:
    """Time to first token of a request, and time per output token of each of its choices."""

    def __init__(self, arrived: float, metrics: IngressMetrics, api_name: str):
        self._arrived = arrived
        self._metrics = metrics
        self._tags = {"api": api_name}
        self._first: dict[str, tuple[float, int]] = {}  # request id -> (first token time, tokens)

    def on_chunk(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        if not self._first:
            self._metrics.ttft.observe(now - self._arrived, tags=self._tags)
        first, tokens = self._first.get(chunk.request_id, (now, 0))
        tokens += len(chunk.token_ids)
        self._first[chunk.request_id] = (first, tokens)
        self._metrics.output_tokens.inc(len(chunk.token_ids), tags=self._tags)
        if chunk.finished and tokens > 1:
            self._metrics.time_per_output_token.observe((now - first) / (tokens - 1), tags=self._tags)


async def _prepend(first: Chunk, rest: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    yield first
    async for chunk in rest:
        yield chunk


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP and handle front end (see the module docstring)."""

    def __init__(self, batcher: DeploymentHandle, args: AppArgs):
        from model.ckpt import checkpoint

        self._batcher = batcher
        self._batcher_generate = batcher.options(method_name="generate", stream=True)
        self._args = args
        # The tokenizer of a local checkpoint directory, else GPT-2's (GPT-J's own; a gs:// checkpoint
        # is mirrored only by the replica, and its tokenizer files are GPT-2's).
        local = args.checkpoint not in checkpoint.PRESETS and not checkpoint.is_uri(args.checkpoint)
        self._tokenizer = Tokenizer.for_checkpoint(args.checkpoint if local else None)
        self._info: ModelInfo | None = None
        self._started = int(time.time())
        self._metrics = IngressMetrics()
        self._api_key = read_api_key(args.api_key_env)
        self._openapi = openapi_document(args)

    # -- the Python handle API ------------------------------------------------------------------

    async def generate(self, request: CompletionRequest | dict) -> CompletionResponse:
        """Complete `request` (a CompletionRequest, `stream` ignored); raises InvalidRequest / Unavailable."""
        request = parse(CompletionRequest, request)
        assembler, chunks = await self._start_completion(request, time.perf_counter(), "handle")
        async for chunk in chunks:
            assembler.add(chunk)
        return assembler.response()

    async def generate_stream(self, request: CompletionRequest | dict) -> AsyncIterator[CompletionChunk]:
        """Like `generate`, streamed: call as `handle.generate_stream.options(stream=True).remote(request)`.
        Yields one CompletionChunk per chunk of tokens, then a usage-only one if asked for."""
        request = parse(CompletionRequest, request)
        assembler, chunks = await self._start_completion(request, time.perf_counter(), "handle")
        async for chunk in chunks:
            yield assembler.add(chunk)
        if request.stream_options and request.stream_options.include_usage:
            yield assembler.usage_event()

    async def stats(self) -> dict:
        """The batcher's counters and every replica's engine counters (for tests and operators)."""
        return await self._batcher.stats.remote()

    # -- HTTP -------------------------------------------------------------------------------------

    @api.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, 200: {
        "description": "The completion; with `stream: true`, server-sent events: one completion chunk per event, "
                       "then `data: [DONE]`",
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
    }})
    async def completions(self, http: Request):
        arrived = time.perf_counter()
        self._authorize(http)
        request = parse(CompletionRequest, await read_body(http, self._args.max_request_bytes))
        assembler, chunks = await self._start_completion(request, arrived, "completions")
        if not request.stream:
            async for chunk in chunks:
                assembler.add(chunk)
            return JSONResponse(assembler.response().model_dump(mode="json"))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(self._sse(assembler, chunks, include_usage), media_type="text/event-stream")

    @api.get("/v1/models", response_model=ModelList)
    async def models(self, http: Request) -> ModelList:
        self._authorize(http)
        return ModelList(data=[ModelCard(id=self._args.model_name, created=self._started)])

    @api.post("/generate", response_model=SaxmlGenerateResponse, responses=ERRORS)
    async def saxml_generate(self, http: Request):
        arrived = time.perf_counter()
        self._authorize(http)
        request = parse(SaxmlGenerateRequest, await read_body(http, self._args.max_request_bytes))
        self._check_model(request.model)
        engine_request = await asyncio.to_thread(plan_saxml, request, await self._model_info(), self._tokenizer,
                                                 self._args.default_max_tokens, self._args.max_tokens_limit)
        self._metrics.prompt_tokens.inc(len(engine_request.prompt_ids), tags={"api": "saxml"})
        text, score = "", 0.0
        async for chunk in self._chunks([engine_request], _Timing(arrived, self._metrics, "saxml")):
            text += chunk.text
            score += sum(chunk.logprobs)
        return JSONResponse(SaxmlGenerateResponse(generate_response=[(text, score)]).model_dump(mode="json"))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "alive"}

    @api.get("/readyz", responses={503: _error("No model replica has loaded and warmed up yet.")})
    async def readyz(self):
        try:
            info = await asyncio.wait_for(self._batcher.info.remote(), READY_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001  (any failure means: not ready)
            return error_response(NotReady(f"no warm model replica: {type(e).__name__}: {e}"))
        self._info = info
        return {"status": "ready", "model": self._args.model_name}

    @api.get("/v1/stats")
    async def http_stats(self, http: Request) -> dict:
        self._authorize(http)
        return await self.stats()

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self) -> JSONResponse:
        return JSONResponse(self._openapi)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, http: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=f"{http.scope.get('root_path', '')}/openapi.json", title=api.title)

    # -- the shared path ---------------------------------------------------------------------------

    def _authorize(self, http: Request) -> None:
        """401 unless the request carries the API key (when one is required); before the body is read."""
        if self._api_key is None:
            return
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send it as 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), self._api_key.encode()):
            raise Unauthorized("invalid API key: send this server's key as 'Authorization: Bearer <key>'")

    def _check_model(self, model: str) -> None:
        if model != self._args.model_name:
            raise InvalidRequest(f"unknown model {model!r}; this server serves {self._args.model_name!r}", "model")

    async def _model_info(self) -> ModelInfo:
        if self._info is None:
            try:
                self._info = await asyncio.wait_for(self._batcher.info.remote(), READY_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001
                raise NotReady(f"the model is not ready yet ({type(e).__name__}); retry later") from None
        return self._info

    async def _start_completion(
        self, request: CompletionRequest, arrived: float, api_name: str
    ) -> tuple[CompletionAssembler, AsyncIterator[Chunk]]:
        self._check_model(request.model)
        # Tokenising runs on a worker thread (the tokenizer releases the GIL): a prompt of up to
        # max_request_bytes takes up to a second, and the event loop is relaying every other stream.
        plan = await asyncio.to_thread(
            plan_completion, request, await self._model_info(), self._tokenizer, self._args.default_max_tokens,
            self._args.max_n, self._args.max_pending_requests, self._args.max_tokens_limit,
        )
        self._metrics.prompt_tokens.inc(sum(len(p) for p in plan.prompts), tags={"api": api_name})
        chunks = self._chunks(plan.requests, _Timing(arrived, self._metrics, api_name))
        # Wait for every choice's first chunk before answering, so refusals are still statuses.
        first = await chunks.__anext__()
        return CompletionAssembler(request, plan, self._args.model_name, self._tokenizer), _prepend(first, chunks)

    async def _chunks(self, requests: list[EngineRequest], timing: _Timing) -> AsyncIterator[Chunk]:
        """The chunks of all `requests`, merged as they arrive; first every request's first chunk."""
        streams = [self._batcher_generate.remote(r) for r in requests]
        unfinished = set(range(len(streams)))
        queue: asyncio.Queue[tuple[int, Chunk | BaseException]] = asyncio.Queue()

        async def pump(i: int, stream: DeploymentResponseGenerator) -> None:
            try:
                async for chunk in stream:
                    queue.put_nowait((i, chunk))
            except Exception as e:  # noqa: BLE001  (re-raised by the consumer)
                queue.put_nowait((i, e))

        async def first(stream: DeploymentResponseGenerator) -> Chunk:
            try:
                return await stream.__anext__()
            except Exception as e:  # noqa: BLE001
                raise as_serve_error(e) from None

        pumps = []
        try:
            firsts = await asyncio.gather(*(first(s) for s in streams))
            for chunk in firsts:
                if chunk.error:
                    raise chunk_error(chunk, self._args.retry_after_s)
            pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams) if not firsts[i].finished]
            for i, chunk in enumerate(firsts):
                queue.put_nowait((i, chunk))
            while unfinished:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise as_serve_error(item)
                if item.error:
                    raise chunk_error(item, self._args.retry_after_s)
                if item.finished:
                    unfinished.discard(i)
                timing.on_chunk(item)
                yield item
        finally:
            for task in pumps:
                task.cancel()
            for i in unfinished:
                streams[i].cancel()

    async def _sse(self, assembler: CompletionAssembler, chunks: AsyncIterator[Chunk], include_usage: bool):
        """Server-sent events: one `data:` line per chunk, usage if asked, then `data: [DONE]`."""
        try:
            async for chunk in chunks:
                yield f"data: {assembler.add(chunk).model_dump_json()}\n\n"
        except ServeError as e:  # the response has started: report the error in the stream
            yield f"data: {json.dumps(error_body(as_serve_error(e)))}\n\n"
            return
        if include_usage:
            yield f"data: {assembler.usage_event().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
