"""The ingress: the HTTP API (FastAPI) and the Python handle API, in front of the batcher.

HTTP routes:
    POST /v1/completions   OpenAI completions; `stream: true` answers with server-sent events, one
                           event per chunk of tokens, ending with `data: [DONE]`
    GET  /v1/models        the one model, under `args.model_name`
    GET  /v1/models/{id}   that model (OpenAI's models.retrieve); 404 for any other name
    POST /tokenize         vLLM's: {"prompt"} -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize       vLLM's: {"tokens"} -> {"prompt"}
    POST /generate         Saxml's HTTP shape: {"model", "query", "extra_inputs"} -> {"generate_response"}:
                           [[text, score]], or with extra_inputs.beam_size > 1 every finished beam,
                           best first (token ids in and out with the app's saxml_tokenized)
    GET  /healthz          liveness: this process answers (also /health, vLLM's name; HEAD too)
    GET  /readyz           readiness: a model replica has loaded and warmed up (503 until then; HEAD too)
    GET  /v1/stats         the batcher's and every replica's counters (prefill batches, slots, ...)
    GET  /openapi.json     this API's OpenAPI document (app.openapi; and /docs, its Swagger UI)

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

A request's life here: screen its headers (431 for too many or too large, 400 for a bad
X-Request-Id: app.guard), check the API key (401) and the Content-Type (415 unless application/json),
take a place under the ingress's own bound (app.guard: at the bound the longest-running upload is given
up on, else 503), read the body within `request_body_timeout_s` (408) and parse it (413 over
`max_request_bytes`, 422 naming the field for a bad body, strict JSON: app.errors), check the model
name, check prompt counts and text sizes, then tokenise and check every prompt against the engine's
limits and the server's policy (400 naming the field: app.completions, on a worker thread), then one
streaming call to the batcher per choice, merged into one stream (app.streaming). The response starts
when the batcher has admitted every choice, so a refusal (503 with Retry-After) or a rejection is
still an HTTP status, never a broken stream, and a stream's status and headers go out at once, not
when a decode slot frees up. /healthz, /readyz and /v1/stats take no place under the bound: they never
wait behind model requests or their bodies. If the client disconnects, Serve cancels this request
and, with it, the batcher calls it made; the replica frees their slots at its next step.

Tokenising and detokenising: prompts are encoded here; the replica's driver detokenises incrementally
and sends text with the token ids. Both use the checkpoint's tokenizer as `model.ckpt.tokenizer_for`
answers it, the one rule for every layer.

No `from __future__ import annotations` here: FastAPI must see the route parameters' real types.
"""

import asyncio
import hmac
import os
import time
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.args import AppArgs
from app.completions import CompletionAssembler, ServerPolicy, plan_completion, plan_saxml, saxml_answer
from app.errors import error_response, excerpt, on_serve_error, parse
from app.guard import Guard, check_request_id, require_json, screen_headers
from app.metrics import IngressMetrics
from app.openapi import ERRORS, SSE_EVENT, error_doc, openapi_document
from app.protocol import Chunk, InvalidRequest, NotReady, ServeError, Unauthorized
from app.schemas import (
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SaxmlGenerateRequest,
    SaxmlGenerateResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from app.streaming import Timing, merge_streams, sse_events
from model.ckpt import tokenizer_for
from model.serving.request import Limits, Request

READY_TIMEOUT_S = 5.0

# The OpenAPI document depends on the deployment's args (the model's name, whether a key is required),
# so the ingress serves it from its own routes rather than FastAPI's. No trailing-slash redirects:
# Starlette builds their Location from the client's Host header (an open redirect); /v1/models/ is a 404.
api = FastAPI(title="GPT-J on Ray Serve", description="OpenAI completions and Saxml /generate for GPT-J.",
              openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)
api.add_exception_handler(ServeError, on_serve_error)


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


@serve.deployment
@serve.ingress(api)
class Ingress:
    """HTTP and handle front end (see the module docstring)."""

    def __init__(self, batcher: DeploymentHandle, args: AppArgs):
        self._batcher = batcher
        self._batcher_generate = batcher.options(method_name="generate", stream=True)
        self._args = args
        self._tokenizer = tokenizer_for(args.checkpoint)  # the replica's driver detokenises with the same
        self._policy = ServerPolicy.from_args(args, self._tokenizer)
        self._guard = Guard(args.ingress_request_limit, args.request_body_timeout_s, args.retry_after_s)
        self._limits: Limits | None = None  # the engine's, from the first warm replica that answers
        self._started = int(time.time())
        self._metrics = IngressMetrics()
        self._api_key = read_api_key(args.api_key_env)
        self._openapi = openapi_document(api, args)

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
        """The batcher's counters, every replica's engine counters, and this ingress replica's own (its
        bound, bodies being read, uploads given up on: app.guard), for tests and operators."""
        return {**await self._batcher.stats.remote(), "ingress": self._guard.stats()}

    # -- HTTP -------------------------------------------------------------------------------------

    @api.post("/v1/completions", response_model=CompletionResponse, responses={**ERRORS, 200: {
        "description": "The completion; with `stream: true`, server-sent events: one completion chunk per event, "
                       "then `data: [DONE]`",
        "content": {"text/event-stream": {"itemSchema": SSE_EVENT}},
    }})
    async def completions(self, http: HTTPRequest):
        arrived = time.perf_counter()
        self._screen(http, has_body=True)
        with self._guard.hold():
            request = parse(CompletionRequest, await self._guard.read_body(http, self._policy.max_request_bytes))
            assembler, chunks = await self._start_completion(request, arrived, "completions")
            if not request.stream:
                async for chunk in chunks:
                    assembler.add(chunk)
                return JSONResponse(assembler.response().model_dump(mode="json"))
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return StreamingResponse(sse_events(assembler, chunks, include_usage), media_type="text/event-stream")

    @api.get("/v1/models", response_model=ModelList)
    async def models(self, http: HTTPRequest) -> ModelList:
        self._screen(http)
        return ModelList(data=[ModelCard(id=self._args.model_name, created=self._started)])

    @api.get("/v1/models/{model_id}", response_model=ModelCard, responses={404: error_doc("No such model.")})
    async def model(self, model_id: str, http: HTTPRequest) -> ModelCard:
        self._screen(http)
        if model_id != self._args.model_name:
            raise InvalidRequest(f"the model {excerpt(model_id)} does not exist; this server serves "
                                 f"{self._args.model_name!r}", "model", 404)
        return ModelCard(id=self._args.model_name, created=self._started)

    @api.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(self, http: HTTPRequest):
        self._screen(http, has_body=True)
        with self._guard.hold():
            request = parse(TokenizeRequest, await self._guard.read_body(http, self._policy.max_request_bytes))
            if request.model is not None:
                self._check_model(request.model)
            limits = await self._engine_limits()
            tokens = await asyncio.to_thread(self._tokenizer.encode, request.prompt)
        strs = self._tokenizer.pieces(tokens) if request.return_token_strs else None
        return JSONResponse(TokenizeResponse(count=len(tokens), max_model_len=limits.max_total_length, tokens=tokens,
                                             token_strs=strs).model_dump(mode="json"))

    @api.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(self, http: HTTPRequest):
        self._screen(http, has_body=True)
        with self._guard.hold():
            request = parse(DetokenizeRequest, await self._guard.read_body(http, self._policy.max_request_bytes))
            if request.model is not None:
                self._check_model(request.model)
        vocab = self._tokenizer.vocab_size
        bad = next((t for t in request.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return JSONResponse(DetokenizeResponse(prompt=self._tokenizer.decode(request.tokens)).model_dump(mode="json"))

    @api.post("/generate", response_model=SaxmlGenerateResponse, responses=ERRORS)
    async def saxml_generate(self, http: HTTPRequest):
        arrived = time.perf_counter()
        self._screen(http, has_body=True)
        with self._guard.hold():
            request = parse(SaxmlGenerateRequest, await self._guard.read_body(http, self._policy.max_request_bytes))
            self._check_model(request.model)
            engine_request = await asyncio.to_thread(plan_saxml, request, self._tokenizer,
                                                     await self._engine_limits(), self._policy)
            self._metrics.prompt_tokens.inc(len(engine_request.prompt_ids), tags={"api": "saxml"})
            chunks = self._merged([engine_request], Timing(arrived, self._metrics, "saxml"))
            await chunks.__anext__()  # app.streaming.ADMITTED
            received = [chunk async for chunk in chunks]
        answer = saxml_answer(received, self._args.saxml_tokenized)
        return JSONResponse(SaxmlGenerateResponse(generate_response=answer).model_dump(mode="json"))

    @api.get("/healthz")
    @api.head("/healthz", include_in_schema=False)
    async def healthz(self, http: HTTPRequest) -> dict:
        screen_headers(http.headers.raw, self._args.max_header_count, self._args.max_header_bytes)
        return {"status": "alive"}

    @api.get("/health")
    @api.head("/health", include_in_schema=False)
    async def health(self, http: HTTPRequest) -> dict:
        """vLLM's name for liveness (guidellm checks it before a benchmark)."""
        return await self.healthz(http)

    @api.get("/readyz", responses={503: error_doc("No model replica has loaded and warmed up yet.")})
    @api.head("/readyz", include_in_schema=False)
    async def readyz(self, http: HTTPRequest):
        screen_headers(http.headers.raw, self._args.max_header_count, self._args.max_header_bytes)
        try:
            info = await asyncio.wait_for(self._batcher.info.remote(), READY_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001  (any failure means: not ready)
            return error_response(NotReady(f"no warm model replica: {type(e).__name__}: {e}"))
        self._limits = info
        return {"status": "ready", "model": self._args.model_name}

    @api.get("/v1/stats")
    async def http_stats(self, http: HTTPRequest) -> dict:
        self._screen(http)
        return await self.stats()

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json(self) -> JSONResponse:
        return JSONResponse(self._openapi)

    @api.get("/docs", include_in_schema=False)
    async def docs(self, http: HTTPRequest) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=f"{http.scope.get('root_path', '')}/openapi.json", title=api.title)

    # -- the shared path ---------------------------------------------------------------------------

    def _screen(self, http: HTTPRequest, has_body: bool = False) -> None:
        """What the headers alone decide, before any body is read: their count and size (431), the
        request id (400), the API key (401), and for a route with a body its Content-Type (415)."""
        screen_headers(http.headers.raw, self._args.max_header_count, self._args.max_header_bytes)
        check_request_id(http.headers.get("x-request-id"))
        self._authorize(http)
        if has_body:
            require_json(http.headers.get("content-type"))

    def _authorize(self, http: HTTPRequest) -> None:
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
            raise InvalidRequest(f"unknown model {excerpt(model)}; this server serves {self._args.model_name!r}",
                                 "model")

    async def _engine_limits(self) -> Limits:
        if self._limits is None:
            try:
                self._limits = await asyncio.wait_for(self._batcher.info.remote(), READY_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001
                raise NotReady(f"the model is not ready yet ({type(e).__name__}); retry later") from None
        return self._limits

    async def _start_completion(
        self, request: CompletionRequest, arrived: float, api_name: str
    ) -> tuple[CompletionAssembler, AsyncIterator[Chunk]]:
        self._check_model(request.model)
        # Tokenising runs on a worker thread (the tokenizer releases the GIL): a prompt of up to
        # max_request_bytes takes up to a second, and the event loop is relaying every other stream.
        plan = await asyncio.to_thread(plan_completion, request, self._tokenizer, await self._engine_limits(),
                                       self._policy)
        self._metrics.prompt_tokens.inc(sum(len(p) for p in plan.prompts), tags={"api": api_name})
        chunks = self._merged(plan.requests, Timing(arrived, self._metrics, api_name))
        # Wait until the batcher has admitted every choice before answering, so refusals are still statuses.
        await chunks.__anext__()  # app.streaming.ADMITTED
        return CompletionAssembler(request, plan, self._args.model_name, self._tokenizer), chunks

    def _merged(self, requests: list[Request], timing: Timing) -> AsyncIterator[Chunk]:
        """One streaming batcher call per request, merged (app.streaming: first chunks first)."""
        streams = [self._batcher_generate.remote(r) for r in requests]
        return merge_streams(streams, timing, self._args.retry_after_s)
