"""What the three deployments send each other, and the errors that cross deployment boundaries.

    Ingress --Request-------------------> Batcher --list[Request] (one prefill batch)--> Replica
    Ingress <--Chunk, Chunk, ... (stream)-- Batcher <--list[Chunk], list[Chunk], ... (stream)-- Replica
    Ingress --info()--------------------> Batcher --info()----------------------------> Replica -> Limits

The ingress sends one `model.serving.request.Request` per completion choice (a prompt, already
tokenised and checked against the engine's `Limits`, with its sampling settings) as a streaming call
to the batcher. Both are the engine's own types (model.serving.request imports neither JAX nor Ray):
the replica submits a request as it arrives, and `info()` answers with the engine's limits, which
the ingress checks requests against. The batcher forwards whole prefill batches to a replica as one
streaming call and routes the replica's chunks back to each request's own stream. A `Chunk` carries
every token one request produced since its previous chunk (several tokens per chunk, never one RPC
per token per hop); the last chunk of a request has `finish_reason` set, and for a beam search (a
request with `num_beams` > 1, answered whole in that one chunk) the best beam's `score` and every
finished beam (`model.serving.output.Beam`, best first). The batcher's first chunk of
every request it accepts is an `admitted` one (no tokens): the ingress can start a streamed response
then, rather than when a decode slot frees up for it. A per-request failure
travels as a chunk with `error` (and, for a rejection, `error_param`: the field at fault), so one bad
request never fails the others of its batch; whole-call failures are exceptions.

Exceptions carry their HTTP status so the ingress maps them without guessing; they keep their
constructor arguments in `args`, so they survive pickling across actors (Ray re-raises them in the
caller as a subclass of both `RayTaskError` and the original class).
"""

from __future__ import annotations

import dataclasses

from model.serving.output import Beam


@dataclasses.dataclass
class Chunk:
    """The tokens (and their text) one request produced since its previous chunk."""

    request_id: str
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    top_logprobs: list[dict[int, float]] | None = None  # per token, when the request asked for top_logprobs
    # The request's prompt scores (model.serving.output.Output), on the chunk of its first token.
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error", on a request's last chunk
    error: str | None = None
    error_status: int = 500  # the HTTP status for `error` (400: the engine rejected the request)
    error_param: str | None = None  # with a 4xx: the request field at fault (RequestRejected.param)
    overloaded: bool = False  # with 503: refused because the server is at capacity (not a failure)
    admitted: bool = False  # the batcher accepted the request (its first chunk; no tokens, not finished)
    score: float | None = None  # beam search, on the last chunk: the best beam's score (its tokens are token_ids)
    beams: list[Beam] | None = None  # beam search, on the last chunk: every finished beam, best first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class ServeError(Exception):
    """An error with an HTTP status; the message is shown to the client as is."""

    status_code = 500

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class InvalidRequest(ServeError):
    """The request cannot be served as asked; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status_code: int = 400):
        super().__init__(message, param, status_code)
        self.param = param
        self.status_code = status_code


class Unavailable(ServeError):
    """Not served now, safe to send again after `retry_after_s` (HTTP 503 with Retry-After): a
    deployment on the request's path died, or the server is at capacity."""

    status_code = 503

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message, retry_after_s)
        self.retry_after_s = retry_after_s


class Overloaded(Unavailable):
    """Too many requests in flight: try again after `retry_after_s`."""


class RequestTimeout(ServeError):
    """The request's body did not arrive in time, or the ingress gave up on it to admit another request
    (HTTP 408; the connection is closed)."""

    status_code = 408


class Unauthorized(ServeError):
    """The HTTP request lacks the API key the server requires (HTTP 401, WWW-Authenticate: Bearer)."""

    status_code = 401


class NotReady(ServeError):
    """No model replica has finished loading and warming up yet."""

    status_code = 503


def original(e: BaseException) -> BaseException:
    """The exception a deployment raised: Ray re-raises it in the caller as a RayTaskError whose
    `cause` is the original (with its attributes, such as a ServeError's status)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def describe(e: BaseException) -> str:
    """`Type: message` of a failure, one line, for clients and logs (Ray puts actor details on the
    lines after the first)."""
    e = original(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
