"""What the ingress checks before it does any work for an HTTP request, and how it reads a body
without letting a slow or stalled client hold capacity that others need. No Ray here.

Serve's proxy hands a request to the ingress as soon as its headers are in; the body is pulled from
the proxy while the route runs, and every request the ingress holds counts against its
`max_ongoing_requests`, health checks included. A client that sends headers and a few body bytes and
then nothing would hold a place for as long as it likes, and a few dozen such clients used to fill
the ingress (every route hung, /readyz too). So:

- `screen_headers`, `check_request_id`, `require_json`: cheap refusals from the headers alone (431
  for too many or too large headers, 400 for an `X-Request-Id` that is not a short token, 415 for a
  body that is not `application/json`: a web page can send `text/plain` to any origin without asking).
- `Guard.hold()`: the model routes' own admission bound, `max_ingress_requests` per ingress replica
  (from arrival to the handler's return: reading the body, tokenising, waiting for or generating a
  non-streamed answer). At the bound, the request whose body has been arriving the longest is given
  up on (408) to make room, if it has been arriving for STALLED_AFTER_S at least; otherwise the
  newcomer gets 503 with Retry-After at once. (Under plain overload every body is fresh: clients that
  sent theirs whole are refused with a retryable 503, not cut off with a 408.) The health, readiness and stats routes never take a place, and app.builder gives the
  deployment `max_ongoing_requests` above this bound plus the batcher's, so those routes never queue
  behind model requests.
- `Guard.read_body()`: the body within `request_body_timeout_s` of the route starting to read it, or
  408 (with `Connection: close`, so the proxy drops the connection too).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import re
import time
from typing import Iterator

from fastapi import Request as HTTPRequest

from app.errors import excerpt, read_body
from app.protocol import InvalidRequest, Overloaded, RequestTimeout

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
STALLED_AFTER_S = 1.0  # a body still arriving this long after its read began may be given up on for another
JSON_MEDIA_TYPE = "application/json"


def screen_headers(headers: list[tuple[bytes, bytes]], max_count: int, max_bytes: int) -> None:
    """431 when the request has more than `max_count` headers, or more than `max_bytes` of them
    (names, values and separators, as sent)."""
    if len(headers) > max_count:
        raise InvalidRequest(f"the request has {len(headers)} headers; at most {max_count} are accepted", None, 431)
    size = sum(len(name) + len(value) + 4 for name, value in headers)  # "name: value\r\n"
    if size > max_bytes:
        raise InvalidRequest(f"the request's headers are {size} bytes; at most {max_bytes} are accepted", None, 431)


def check_request_id(value: str | None) -> None:
    """400 unless `X-Request-Id` is absent or 1-128 characters of [A-Za-z0-9._:-] (Serve's proxy
    echoes it in the response and its logs)."""
    if value is not None and not REQUEST_ID.fullmatch(value):
        raise InvalidRequest(
            f"X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -, got {excerpt(value)}", None, 400
        )


def require_json(content_type: str | None) -> None:
    """415 unless the body is declared `application/json` (parameters such as charset allowed)."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        got = excerpt(content_type) if content_type else "no Content-Type"
        raise InvalidRequest(f"the body must be sent as Content-Type: {JSON_MEDIA_TYPE}, got {got}", None, 415)


class Guard:
    """The model routes' admission bound on one ingress replica and their body reads (see the module
    docstring). Counters: `held` now, `uploads` (bodies being read) now, and since start `refused`
    (503 at the bound), `evicted` (uploads given up on to admit another request) and `timed_out`."""

    def __init__(self, max_requests: int, body_timeout_s: float, retry_after_s: float):
        self.max_requests = max_requests
        self.body_timeout_s = body_timeout_s
        self.retry_after_s = retry_after_s
        self.held = 0
        self._uploads: dict[int, tuple[asyncio.Task, float]] = {}  # (read, when it began), in that order
        self._evicted: set[int] = set()
        self._ids = itertools.count()
        self.counts = collections.Counter(refused=0, evicted=0, timed_out=0)

    def stats(self) -> dict:
        return {"held": self.held, "uploads": len(self._uploads), "max_ingress_requests": self.max_requests,
                **self.counts}

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """A place for one model request for as long as the block runs; at the bound, the oldest
        stalled upload is given up on for it, or Overloaded (503) when there is none."""
        if self.held >= self.max_requests and not self._evict_oldest():
            self.counts["refused"] += 1
            refusal = Overloaded(f"the server holds {self.held} requests here (max_ingress_requests="
                                 f"{self.max_requests}); retry later", self.retry_after_s)
            refusal.close_connection = True  # refused before its body was read (app.errors.error_response)
            raise refusal
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    def _evict_oldest(self) -> bool:
        """Give up on the oldest body still being read after STALLED_AFTER_S; False if there is none."""
        stalled_since = time.monotonic() - min(STALLED_AFTER_S, self.body_timeout_s)
        for key, (task, began) in self._uploads.items():
            if began > stalled_since:
                return False  # this one and every later one are fresh
            if not task.done():  # a finished read is about to be picked up by its route
                del self._uploads[key]
                self._evicted.add(key)
                self.counts["evicted"] += 1
                task.cancel()
                return True
        return False

    async def read_body(self, http: HTTPRequest, limit: int) -> bytes:
        """The body (413 past `limit` bytes: app.errors.read_body), within `body_timeout_s`, else 408;
        408 too if the read is given up on to admit another request."""
        key = next(self._ids)
        task = asyncio.ensure_future(read_body(http, limit))
        self._uploads[key] = (task, time.monotonic())
        try:
            done, _ = await asyncio.wait({task}, timeout=self.body_timeout_s)
        finally:
            self._uploads.pop(key, None)
            if not task.done():
                task.cancel()
        if key in self._evicted:
            self._evicted.discard(key)
            raise RequestTimeout("the request body was still arriving when the server needed its place for another "
                                 "request; send the whole body with the request")
        if not done:
            self.counts["timed_out"] += 1
            raise RequestTimeout(f"the request body did not arrive within {self.body_timeout_s:g} s "
                                 "(request_body_timeout_s)")
        return task.result()
