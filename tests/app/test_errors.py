"""app.errors, without Ray: every failure's HTTP status, body and headers, and body parsing."""

import asyncio
import json

import pytest
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from app.errors import as_serve_error, chunk_error, error_body, error_response, parse, read_body
from app.protocol import Chunk, InvalidRequest, NotReady, Overloaded, ServeError, Unauthorized, Unavailable
from app.schemas import CompletionRequest


def test_serve_errors_pass_through_even_when_ray_wrapped_them():
    error = InvalidRequest("n must be in [1, 8], got 9", "n")
    assert as_serve_error(error) is error
    wrapped = RayTaskError("generate", "Traceback ...", error).as_instanceof_cause()
    unwrapped = as_serve_error(wrapped)
    assert isinstance(unwrapped, InvalidRequest) and (unwrapped.param, unwrapped.status_code) == ("n", 400)


def test_failures_of_calls_map_to_statuses():
    overloaded = as_serve_error(BackPressureError(num_queued_requests=3, max_queued_requests=2, retry_after_s=4.0))
    assert isinstance(overloaded, Overloaded) and overloaded.retry_after_s == 4.0
    assert "the server is at capacity" in overloaded.message
    assert as_serve_error(BackPressureError(num_queued_requests=3, max_queued_requests=2)).retry_after_s == 1.0
    died = as_serve_error(RayActorError())
    assert type(died) is Unavailable and died.status_code == 503
    assert died.message.startswith("the batcher serving this request failed (RayActorError: ")
    internal = as_serve_error(ValueError("boom\nsecond line"))
    assert type(internal) is ServeError and internal.status_code == 500
    assert internal.message == "internal error: ValueError: boom"


def test_error_chunks_map_to_statuses():
    overloaded = chunk_error(Chunk("r", error="full", error_status=503, overloaded=True), 2.0)
    assert isinstance(overloaded, Overloaded) and overloaded.retry_after_s == 2.0 and overloaded.message == "full"
    lost = chunk_error(Chunk("r", error="replica died", error_status=503), 2.0)
    assert type(lost) is Unavailable and lost.retry_after_s == 2.0
    failed = chunk_error(Chunk("r", error="model replica failed: X"), 2.0)
    assert type(failed) is ServeError and failed.status_code == 500 and failed.message == "model replica failed: X"


def test_rejection_chunks_name_their_field():
    unnamed = chunk_error(Chunk("r", error="prompt has 70 tokens", error_status=400), 1.0)
    assert isinstance(unnamed, InvalidRequest) and (unnamed.param, unnamed.status_code) == ("prompt", 400)
    named = chunk_error(Chunk("r", error="top_p must be in (0, 1]", error_status=400, error_param="top_p"), 1.0)
    assert (named.param, named.message) == ("top_p", "top_p must be in (0, 1]")


@pytest.mark.parametrize("error,status,kind,param", [
    (InvalidRequest("bad n", "n"), 400, "invalid_request_error", "n"),
    (InvalidRequest("too big", None, 413), 413, "invalid_request_error", None),
    (Unauthorized("missing API key"), 401, "authentication_error", None),
    (Overloaded("full", 1.0), 503, "server_error", None),
    (NotReady("warming up"), 503, "server_error", None),
    (ServeError("internal error: X"), 500, "server_error", None),
])
def test_error_bodies_are_openais(error, status, kind, param):
    body = error_body(error)
    assert body == {"error": {"message": error.message, "type": kind, "param": param, "code": status}}
    response = error_response(error)
    assert response.status_code == status and json.loads(response.body) == body


def test_error_headers():
    assert error_response(Overloaded("full", 0.2)).headers["retry-after"] == "1"  # at least a second
    assert error_response(Unavailable("lost", 2.6)).headers["retry-after"] == "3"
    assert error_response(Unauthorized("no key")).headers["www-authenticate"] == "Bearer"
    plain = error_response(InvalidRequest("bad", "n")).headers
    assert "retry-after" not in plain and "www-authenticate" not in plain
    assert "retry-after" not in error_response(NotReady("warming up")).headers  # not an Unavailable


class FakeHTTP:
    """What read_body uses of a Starlette request: headers and the body's parts as they arrive."""

    def __init__(self, parts: list[bytes], content_length: int | None = None):
        self.headers = {} if content_length is None else {"content-length": str(content_length)}
        self._parts = parts
        self.read = 0  # parts consumed

    async def stream(self):
        for part in self._parts:
            self.read += 1
            yield part


def test_read_body():
    assert asyncio.run(read_body(FakeHTTP([b"ab", b"cd"], 4), limit=4)) == b"abcd"
    declared = FakeHTTP([b"x" * 10], content_length=10)
    with pytest.raises(InvalidRequest, match="request body is 10 bytes; the limit is 4") as e:
        asyncio.run(read_body(declared, limit=4))
    assert (e.value.status_code, e.value.param, declared.read) == (413, None, 0)  # refused before reading
    chunked = FakeHTTP([b"abc", b"def", b"ghi", b"jkl"])
    with pytest.raises(InvalidRequest, match="request body exceeds the limit of 5 bytes") as e:
        asyncio.run(read_body(chunked, limit=5))
    assert e.value.status_code == 413 and chunked.read == 2  # stops at the part that passes the limit


def test_parse_is_strict_for_json_only():
    body = {"model": "m", "prompt": "hi", "max_tokens": "10"}
    with pytest.raises(InvalidRequest, match="max_tokens: ") as e:
        parse(CompletionRequest, json.dumps(body).encode())
    assert (e.value.status_code, e.value.param) == (422, "max_tokens")
    assert parse(CompletionRequest, body).max_tokens == 10  # a handle caller's dict: pydantic's usual coercion
    with pytest.raises(InvalidRequest, match="the body is not valid JSON: ") as e:
        parse(CompletionRequest, b'{"model": ')
    assert (e.value.status_code, e.value.param) == (400, None)


def test_parse_names_the_first_bad_field_and_at_most_four():
    body = {"model": "m", "prompt": "hi", "n": 0, "top_p": 0, "top_k": -1, "temperature": -1, "logprobs": -1}
    with pytest.raises(InvalidRequest) as e:
        parse(CompletionRequest, json.dumps(body).encode())
    assert e.value.param == "temperature"  # fields in the model's order
    assert e.value.message.count(": ") == 4
    with pytest.raises(InvalidRequest) as e:
        parse(CompletionRequest, b"[1, 2]")
    assert (e.value.status_code, e.value.param) == (422, "body")
