"""HTTP errors and request bodies: how a failure anywhere on the path reaches a client, and how a
body becomes a request model.

Every failure a client sees is a `ServeError` (app.protocol) with its HTTP status, mapped here once:
- `as_serve_error`: any exception of a call (a deployment's, re-raised by Ray; Serve's back pressure;
  a dead batcher) as the ServeError to show;
- `chunk_error`: a per-request error chunk from the batcher (overload, a replica that died, a request
  the engine rejected) as the same;
- `error_body` / `error_response`: OpenAI's error body (`{"error": {"message", "type", "param",
  "code"}}`), with Retry-After on a 503, WWW-Authenticate on a 401, and `Connection: close` where the
  request's body may be left unread (408, 413, 431, and an error marked `close_connection`: the server
  does not wait for the rest of a body nobody will read).

Echo bounds. A message quotes a client's input only as an `excerpt` (at most EXCERPT_CHARS characters
and its length), and no message is longer than MAX_MESSAGE_CHARS: a 60 KB unknown field name or model
name comes back as a short excerpt, never whole.

Bodies. `read_body` refuses a body over the limit with 413 before reading it when Content-Length
says so, and otherwise as soon as the bytes read pass it. `parse` validates a JSON body strictly
("10" is not an integer, "yes" is not a boolean): 400 for bytes that are not JSON, 422 naming the
first bad field; a handle caller's dict or model is validated the same way, less strictly.
"""

from __future__ import annotations

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from app.protocol import Chunk, InvalidRequest, Overloaded, ServeError, Unauthorized, Unavailable, describe, original
from app.schemas import ErrorDetail, ErrorResponse

# The field a rejection chunk names when the replica did not say (every engine rejection of a
# request that passed the ingress's checks is about its prompt).
DEFAULT_REJECTED_PARAM = "prompt"
EXCERPT_CHARS = 40  # the most of a client's own input a message quotes
MAX_MESSAGE_CHARS = 1000  # the longest message a client gets (RELIABILITY.md promises under 2,000)
MAX_PARAM_CHARS = 64  # the longest `param` (a field name, which a client may have made up)
CLOSE_AFTER = (408, 413, 431)  # statuses after which the connection is closed: the body may be unread


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`text` quoted for a message: whole if short, else its first `limit` characters and its length."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def chunk_error(chunk: Chunk, retry_after_s: float) -> ServeError:
    """The ServeError of an error chunk: 503 (Overloaded when the server is at capacity) with
    `retry_after_s`, an InvalidRequest naming the chunk's field for a 4xx, else a 500."""
    if chunk.error_status == 503:
        kind = Overloaded if chunk.overloaded else Unavailable
        return kind(chunk.error or "unavailable", retry_after_s)
    if chunk.error_status < 500:
        param = chunk.error_param if chunk.error_param is not None else DEFAULT_REJECTED_PARAM
        return InvalidRequest(chunk.error or "rejected", param, chunk.error_status)
    return ServeError(chunk.error or "generation failed")


def error_body(e: ServeError) -> dict:
    """OpenAI's error body for `e`."""
    kind = "invalid_request_error" if e.status_code < 500 else "server_error"
    if e.status_code == 401:
        kind = "authentication_error"
    param = getattr(e, "param", None)
    detail = ErrorDetail(message=bounded(e.message, MAX_MESSAGE_CHARS), type=kind,
                         param=None if param is None else bounded(param, MAX_PARAM_CHARS), code=e.status_code)
    return ErrorResponse(error=detail).model_dump(mode="json")


def error_response(e: ServeError) -> JSONResponse:
    """The HTTP response for `e`: its status, its body, and the headers its status calls for."""
    headers = {}
    if isinstance(e, Unavailable):
        headers["Retry-After"] = str(max(1, round(e.retry_after_s)))
    if isinstance(e, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    if e.status_code in CLOSE_AFTER or getattr(e, "close_connection", False):
        headers["Connection"] = "close"
    return JSONResponse(error_body(e), status_code=e.status_code, headers=headers)


async def on_serve_error(_http: HTTPRequest, e: ServeError) -> JSONResponse:
    """FastAPI's exception handler for every ServeError a route raises."""
    return error_response(as_serve_error(e))


async def read_body(http: HTTPRequest, limit: int) -> bytes:
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
        # A field name in `loc` may be the client's own (an unknown key): quoted as an excerpt only.
        fields = [".".join(_field_name(p) for p in err["loc"]) or "body" for err in errors]
        message = "; ".join(f"{f}: {err['msg']}" for f, err in zip(fields, errors[:4]))
        raise InvalidRequest(message, fields[0].split(".")[0], 422) from None


def _field_name(part: str | int) -> str:
    part = str(part)
    return part if len(part) <= EXCERPT_CHARS else excerpt(part)
