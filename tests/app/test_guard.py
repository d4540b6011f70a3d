"""app.guard, without Ray: the header screens, the ingress's admission bound with its give-up rule,
and the body deadline, on fake requests whose bodies arrive when the test says."""

import asyncio

import pytest

from app import guard
from app.errors import error_response
from app.guard import Guard, check_request_id, require_json, screen_headers
from app.protocol import InvalidRequest, Overloaded, RequestTimeout


class FakeRequest:
    """What Guard.read_body uses of a Starlette request: headers and a body stream that waits on `gate`."""

    def __init__(self, body: bytes = b"{}", gate: asyncio.Event | None = None):
        self.headers = {"content-length": str(len(body))}
        self._body, self._gate = body, gate

    async def stream(self):
        if self._gate is not None:
            await self._gate.wait()
        yield self._body


def test_header_screens():
    screen_headers([(b"a", b"b")] * 64, 64, 16384)
    with pytest.raises(InvalidRequest, match="65 headers; at most 64") as e:
        screen_headers([(b"a", b"b")] * 65, 64, 16384)
    assert e.value.status_code == 431
    with pytest.raises(InvalidRequest, match="bytes; at most 1024") as e:
        screen_headers([(b"x", b"v" * 1100)], 64, 1024)
    assert e.value.status_code == 431
    check_request_id(None)
    check_request_id("a-Z_0.9:x")
    for bad in ("", "a b", "x" * 129, "é"):
        with pytest.raises(InvalidRequest, match="X-Request-Id") as e:
            check_request_id(bad)
        assert e.value.status_code == 400
    require_json("application/json")
    require_json("Application/JSON; charset=utf-8")
    for bad in (None, "text/plain", "application/jsonp", "multipart/form-data; boundary=x"):
        with pytest.raises(InvalidRequest, match="Content-Type: application/json") as e:
            require_json(bad)
        assert e.value.status_code == 415


def test_a_body_that_does_not_arrive_in_time_gets_408_and_a_close():
    async def run():
        g = Guard(max_requests=4, body_timeout_s=0.1, retry_after_s=1)
        assert await g.read_body(FakeRequest(b'{"a": 1}'), 1024) == b'{"a": 1}'
        with pytest.raises(RequestTimeout, match="did not arrive within 0.1 s") as e:
            await g.read_body(FakeRequest(gate=asyncio.Event()), 1024)
        return g, e.value

    g, timeout = asyncio.run(run())
    assert g.counts["timed_out"] == 1 and g.stats()["uploads"] == 0
    response = error_response(timeout)
    assert response.status_code == 408 and response.headers["connection"] == "close"


def test_at_the_bound_a_stalled_upload_makes_room_and_a_fresh_one_does_not(monkeypatch):
    """Two places. Two uploads that never finish: a third request is refused (503, connection closed)
    while they are fresh, and takes the oldest one's place (408) once it has stalled."""
    monkeypatch.setattr(guard, "STALLED_AFTER_S", 0.2)

    async def upload(g: Guard, gate: asyncio.Event):
        with g.hold():
            return await g.read_body(FakeRequest(gate=gate), 1024)

    async def run():
        g = Guard(max_requests=2, body_timeout_s=10, retry_after_s=3)
        never = asyncio.Event()
        first = asyncio.create_task(upload(g, never))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(upload(g, never))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="max_ingress_requests=2") as refused:
            with g.hold():
                pass
        await asyncio.sleep(0.25)  # both stale now
        with g.hold():
            await asyncio.sleep(0)  # the evicted read learns it was given up on
            evicted = await asyncio.gather(first, return_exceptions=True)
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        return g, refused.value, evicted[0]

    g, refused, evicted = asyncio.run(run())
    assert refused.retry_after_s == 3 and error_response(refused).headers["connection"] == "close"
    assert isinstance(evicted, RequestTimeout) and "needed its place" in evicted.message
    assert g.counts == {"refused": 1, "evicted": 1, "timed_out": 0} and g.held == 0
