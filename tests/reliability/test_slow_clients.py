"""Slow and abusive clients, over raw sockets where a real client would never behave so: stalled
uploads, connections that never send a byte, oversized bodies under concurrency, input echoed back,
content types a web page can send, slash redirects, oversized headers, and a stream's headers while it
waits for a decode slot.

One application of its own ("abused" at /abused): the mock engine (tests/mock_driver.py: no weights,
tokens a person can compute) behind the real ingress and batcher, with GPT-2's tokenizer, and short
limits set through its args so that each attack is cheap to provoke: a 3 s body deadline, at most 32
model requests held per ingress replica, 8 requests the batcher holds. Each scenario prints one
`FIGURES {...}` line (pytest -s) that docs/RELIABILITY.md quotes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
import socket
import statistics
import time
import urllib.parse

import httpx
import psutil
import pytest

from app.args import AppArgs
from app.completions import default_request_bytes
from app.guard import STALLED_AFTER_S
from bench.harness import replica_memory_mb
from tests.cluster import MODEL_NAME, wait_until_idle
from tests.mock_driver import mock_driver
from tests.reliability.faulty import FaultInjectingReplica
from tests.reliability.helpers import deploy, figures

APP = "abused"
ARGS = AppArgs(
    model_name=MODEL_NAME, checkpoint="tiny", max_cache_len=256, prompt_buckets=(16, 64), prefill_batch_buckets=(1, 4),
    slots=4, batch_max_size=4, batch_wait_ms=5, max_pending_requests=8, request_body_timeout_s=3.0,
    max_ingress_requests=32, stream_chunk_tokens=4, stream_chunk_ms=20,
)
BODY = {"model": MODEL_NAME, "prompt": [464, 2068], "max_tokens": 8, "ignore_eos": True}
STALLED = 120  # stalled uploads at once: more than the ingress holds (32), so some are given up on early


@pytest.fixture(scope="module")
def abused(ray_cluster) -> str:
    from ray import serve

    deploy(APP, ARGS, replica=FaultInjectingReplica, driver_factory=mock_driver)
    url = f"{ray_cluster}/{APP}"
    wait_until_idle(url)
    yield url
    serve.delete(APP)


def address(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.hostname, parts.port, parts.path


def request_head(path: str, host: str, content_length: int | None = None, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{extra}"
    if content_length is not None:
        head += f"Content-Length: {content_length}\r\n"
    return (head + "\r\n").encode()


async def read_response(reader: asyncio.StreamReader, timeout_s: float) -> tuple[int, dict, bytes, bool]:
    """(status, headers, body, whether the server then closed the connection) of one response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), timeout_s)
    closed = await asyncio.wait_for(reader.read(1), timeout_s) == b""
    return status, headers, body, closed


async def timed(client: httpx.AsyncClient, method: str, path: str, **kw) -> tuple[int, float]:
    start = time.monotonic()
    r = await client.request(method, path, **kw)
    return r.status_code, time.monotonic() - start


def ingress_stats(url: str) -> dict:
    return httpx.get(f"{url}/v1/stats", timeout=30).json()["ingress"]


async def held_uploads(url: str, timeout_s: float = 10.0) -> int:
    """Once the uploads the ingress holds stop changing (every stalled client is in, or answered), how many."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            now = (await client.get("/v1/stats")).json()["ingress"]["uploads"]
            if now == last:
                return now
            last = now
            await asyncio.sleep(0.2)
        return last


# -- stalled uploads ----------------------------------------------------------------------------------


def test_stalled_uploads_are_given_up_on_and_never_block_others(abused):
    """120 clients send complete headers declaring a 1,000-byte body, 10 bytes of it, then nothing.
    The ingress holds 32 of them; those that come while every held one is fresh (under a second) get
    503 at once; once they are stale, normal completions and /readyz are served within seconds, each
    completion taking the place of a stalled upload, which gets 408. Every held upload gets 408 and its
    connection closed no later than the body deadline (3 s); then the ingress holds nothing."""
    host, port, prefix = address(abused)
    path = f"{prefix}/v1/completions"

    async def scenario():
        stalled = []
        for _ in range(STALLED):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(request_head(path, f"{host}:{port}", 1000) + b'{"model": ')
            await writer.drain()
            stalled.append((reader, writer, time.monotonic()))
        held = await held_uploads(abused)
        await asyncio.sleep(STALLED_AFTER_S)  # every held upload is stale now: it may be given up on
        async with httpx.AsyncClient(base_url=abused, timeout=30) as client:
            during = [await timed(client, "POST", "/v1/completions", json=BODY) for _ in range(5)]
            ready = [await timed(client, "GET", "/readyz") for _ in range(3)]
            outcomes = await asyncio.gather(*(read_response(r, ARGS.request_body_timeout_s + 10) for r, _, _ in stalled))
            ended = time.monotonic()
        for _, writer, _ in stalled:
            writer.close()
        return stalled, held, during, ready, outcomes, ended

    stalled, held, during, ready, outcomes, ended = asyncio.run(scenario())
    assert held == ARGS.ingress_request_limit, held
    assert all(status == 200 for status, _ in during), during
    assert all(status == 200 for status, _ in ready), ready
    assert max(s for _, s in during) < 5.0 and max(s for _, s in ready) < 5.0, (during, ready)
    statuses = collections.Counter(status for status, _, _, _ in outcomes)
    assert set(statuses) <= {408, 503}, collections.Counter((o[0], o[2][:100]) for o in outcomes)
    messages = [json.loads(body)["error"]["message"] for _, _, body, _ in outcomes]
    refused = [o for o, m in zip(outcomes, messages) if o[0] == 503]
    assert all("max_ingress_requests=32" in m for o, m in zip(outcomes, messages) if o[0] == 503)
    assert all(int(headers["retry-after"]) >= 1 for _, headers, _, _ in refused)
    assert all(headers.get("connection") == "close" and closed for _, headers, _, closed in outcomes)
    gave_up = sum("needed its place" in m for m in messages)
    timed_out = sum("did not arrive within 3 s" in m for m in messages)
    assert statuses[408] == gave_up + timed_out == ARGS.ingress_request_limit and gave_up >= 1
    assert ended - stalled[-1][2] < ARGS.request_body_timeout_s + 3, "a stalled upload was held past its deadline"
    stats = ingress_stats(abused)
    assert stats["held"] == 0 and stats["uploads"] == 0, stats
    figures("stalled_uploads", stalled=STALLED, max_ingress_requests=ARGS.ingress_request_limit,
            body_timeout_s=ARGS.request_body_timeout_s, refused_503_at_once=statuses[503], answered_408=statuses[408],
            given_up_to_admit_others=gave_up,
            timed_out=timed_out, uploads_held_at_once=held, all_answered_after_s=round(ended - stalled[0][2], 2),
            completion_latency_during_s=[round(s, 3) for _, s in during],
            readyz_latency_during_s=[round(s, 3) for _, s in ready])


def test_a_stalled_upload_alone_is_held_until_the_body_deadline(abused):
    """With room to spare nothing is given up on early: one stalled upload gets 408 at the deadline."""
    host, port, prefix = address(abused)

    async def one():
        reader, writer = await asyncio.open_connection(host, port)
        start = time.monotonic()
        writer.write(request_head(f"{prefix}/generate", f"{host}:{port}", 500) + b'{"mod')
        await writer.drain()
        outcome = await read_response(reader, ARGS.request_body_timeout_s + 10)
        writer.close()
        return outcome, time.monotonic() - start

    (status, headers, body, closed), held_s = asyncio.run(one())
    assert status == 408 and closed and "within 3 s (request_body_timeout_s)" in json.loads(body)["error"]["message"]
    assert ARGS.request_body_timeout_s - 0.5 < held_s < ARGS.request_body_timeout_s + 2, held_s
    figures("stalled_upload_alone", held_s=round(held_s, 2), body_timeout_s=ARGS.request_body_timeout_s)


# -- connections that never send a byte ------------------------------------------------------------------


def proxy_pid() -> int:
    from ray._private import state

    [pid] = [a["Pid"] for a in state.actors(actor_state_name="ALIVE").values() if a["Name"].startswith("SERVE_PROXY")]
    return pid


def proxy_rss_mb() -> float:
    return round(psutil.Process(proxy_pid()).memory_info().rss / 2**20, 1)


def test_silent_connections_cost_the_proxy_a_descriptor_each_and_nothing_else(abused):
    """Ray Serve 2.60's proxy (uvicorn) has no header-read timeout: a connection that never sends a
    byte stays open until the client closes it (keep_alive_timeout_s starts only after a first
    response). 300 such connections must not disturb the app (they never reach the ingress); what they
    cost is one file descriptor each in the proxy, whose limit is the ceiling docs/RELIABILITY.md names."""
    host, port, _ = address(abused)
    proxy = psutil.Process(proxy_pid())
    fds_before = proxy.num_fds()
    silent = [socket.create_connection((host, port)) for _ in range(300)]
    try:
        time.sleep(1.0)
        fds_held = proxy.num_fds()
        start = time.monotonic()
        r = httpx.post(f"{abused}/v1/completions", json=BODY, timeout=30)
        completion_s = time.monotonic() - start
        assert r.status_code == 200 and httpx.get(f"{abused}/readyz", timeout=30).status_code == 200
        time.sleep(4.0)
        for s in silent:  # still open: no EOF to read
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in silent:
            s.close()
    soft, hard = proxy.rlimit(psutil.RLIMIT_NOFILE)
    assert fds_held - fds_before >= 270, (fds_before, fds_held)  # other connections come and go meanwhile
    figures("silent_connections", connections=300, still_open_after_s=5, proxy_fds_before=fds_before,
            proxy_fds_held=fds_held, proxy_nofile_soft=soft, proxy_nofile_hard=hard,
            completion_latency_s=round(completion_s, 3))


# -- oversized bodies ---------------------------------------------------------------------------------------


def test_oversized_bodies_are_refused_cheaply_under_concurrency(abused):
    """8 clients send, for 5 s, bodies a valid request never needs: a declared 1 MiB body, an
    undeclared (chunked) 1 MiB one, a text prompt longer in bytes than the longest prompt can be (under
    the body limit, refused before tokenising), 9 prompts. Meanwhile a normal completion stays fast, and
    the ingress's memory after a second burst is where the first left it: no burst adds to it (the first
    one starts the worker threads and takes the allocator to its high-water mark: Serve's replica
    buffers every body the proxy receives, read or not; the figures show what that costs)."""
    limit = default_request_bytes(ARGS)
    too_long_text = json.dumps({**BODY, "prompt": "é" * (64 * 128 // 2 + 1)}, ensure_ascii=False).encode()  # 8,194 B
    assert len(too_long_text) < limit
    kinds = {
        "declared 1 MiB": (b"{" + b" " * 2**20 + b"}", 413),
        "chunked 1 MiB": (None, 413),
        "text longer than any prompt": (too_long_text, 400),
        "9 prompts": (json.dumps({**BODY, "prompt": ["a"] * 9}).encode(), 400),
    }

    async def chunked():
        for _ in range(16):
            yield b" " * 65536

    async def attacker(client: httpx.AsyncClient, kind: str, until: float, seen: dict) -> None:
        body, status = kinds[kind]
        while time.monotonic() < until:
            r = await client.post("/v1/completions", content=body if body is not None else chunked(),
                                  headers={"content-type": "application/json"})
            assert r.status_code == status, (kind, r.status_code, r.text[:200])
            seen[kind] = seen.get(kind, 0) + 1

    async def normal(client: httpx.AsyncClient, n: int) -> list[float]:
        return [(await timed(client, "POST", "/v1/completions", json=BODY))[1] for _ in range(n)]

    async def scenario(seconds: float):
        seen: dict[str, int] = {}
        async with httpx.AsyncClient(base_url=abused, timeout=60) as client:
            before = await normal(client, 5)
            until = time.monotonic() + seconds
            attackers = [asyncio.create_task(attacker(client, kind, until, seen)) for kind in list(kinds) * 2]
            during = await normal(client, 10)
            await asyncio.gather(*attackers)
        return before, during, seen

    memory_fresh = replica_memory_mb(APP)
    asyncio.run(scenario(5.0))  # the first burst: threads start, buffers reach their high-water mark
    memory_warm = replica_memory_mb(APP)
    before, during, seen = asyncio.run(scenario(5.0))
    memory_after = replica_memory_mb(APP)
    p50_before, p50_during = statistics.median(before), statistics.median(during)
    assert p50_during < 5 * p50_before + 0.5, (before, during)
    assert memory_after["Ingress"] - memory_warm["Ingress"] < 15, (memory_warm, memory_after)
    figures("oversized_bodies", body_limit_bytes=limit, refused=seen, latency_p50_before_s=round(p50_before, 3),
            latency_p50_during_s=round(p50_during, 3), latency_max_during_s=round(max(during), 3),
            ingress_rss_mb_fresh=memory_fresh["Ingress"], ingress_rss_mb_after_first_burst=memory_warm["Ingress"],
            ingress_rss_mb_after_second_burst=memory_after["Ingress"], proxy_rss_mb=proxy_rss_mb())


# -- echoes, content types, redirects, headers -----------------------------------------------------------------


def message_of(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def test_error_messages_never_echo_more_than_an_excerpt(client):
    """A 60 KB unknown field and a 60 KB model name: each message quotes at most 40 characters of it.
    (On the shared app, whose 64 KiB body limit lets such a body through to the parser.)"""
    key = "k" * 60_000
    cases = [(json.dumps({**BODY, key: 1}), 422), (json.dumps({**BODY, "model": "m" * 60_000}), 400)]
    lengths = []
    for content, status in cases:
        r = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text[:300]
        message = message_of(r)
        assert len(r.content) < 2000 and "60000 characters" in message, message
        assert re.search(r"[km]{41}", r.text) is None, "more than a 40-character excerpt of the input came back"
        lengths.append(len(r.content))
    figures("echo_bounds", input_bytes=60_000, response_bytes=lengths)


def test_request_ids_must_be_short_tokens(abused):
    ok = httpx.post(f"{abused}/v1/completions", json=BODY, headers={"x-request-id": "trace-1:a.b_c"}, timeout=30)
    assert ok.status_code == 200
    for bad in ("x" * 129, "has spaces", "<script>"):
        r = httpx.post(f"{abused}/v1/completions", json=BODY, headers={"x-request-id": bad}, timeout=30)
        assert r.status_code == 400 and "X-Request-Id must be" in message_of(r), r.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_bodies_that_are_not_declared_json_get_415(abused, content_type):
    """What a web page can send to any origin without a CORS preflight is refused unread."""
    headers = {} if content_type is None else {"content-type": content_type}
    for route in ("/v1/completions", "/generate"):
        r = httpx.post(f"{abused}{route}", content=json.dumps(BODY), headers=headers, timeout=30)
        assert r.status_code == 415 and "Content-Type: application/json" in message_of(r), r.text


def test_json_with_a_charset_is_served(abused):
    r = httpx.post(f"{abused}/v1/completions", content=json.dumps(BODY),
                   headers={"content-type": "Application/JSON; charset=utf-8"}, timeout=30)
    assert r.status_code == 200, r.text


def test_no_redirect_takes_its_location_from_the_host_header(abused):
    for path in ("/v1/completions/", "/v1/models/", "/readyz/"):
        r = httpx.request("POST" if "completions" in path else "GET", f"{abused}{path}", json=BODY,
                          headers={"host": "evil.example"}, timeout=30, follow_redirects=False)
        assert r.status_code == 404 and "location" not in r.headers, (path, r.status_code, r.headers)


def test_too_many_or_too_large_headers_get_431(abused):
    many = {f"x-h{i}": "v" for i in range(ARGS.max_header_count)}
    r = httpx.post(f"{abused}/v1/completions", json=BODY, headers=many, timeout=30)
    assert r.status_code == 431 and "headers; at most 64" in message_of(r), r.text
    assert r.headers["connection"] == "close"
    big = {"x-big": "v" * ARGS.max_header_bytes}
    for method, route in (("POST", "/v1/completions"), ("GET", "/readyz"), ("GET", "/healthz")):
        r = httpx.request(method, f"{abused}{route}", json=BODY if method == "POST" else None, headers=big, timeout=30)
        assert r.status_code == 431 and "bytes; at most 16384" in message_of(r), (route, r.text)
    under = {f"x-h{i}": "v" * 100 for i in range(40)}
    assert httpx.post(f"{abused}/v1/completions", json=BODY, headers=under, timeout=30).status_code == 200


# -- a stream's headers ---------------------------------------------------------------------------------------


def test_a_stream_gets_its_headers_when_admitted_not_when_a_slot_frees(abused):
    """Every decode slot busy with slow generations: a fifth streamed request gets its status and
    headers at once, its first token only when a slot frees."""
    from ray import serve

    replica = serve.get_deployment_handle("Replica", app_name=APP)
    replica.slow_down.remote(0.05).result()
    long = {**BODY, "max_tokens": 40, "stream": True}

    async def scenario():
        async with httpx.AsyncClient(base_url=abused, timeout=60) as client:
            async def drain(body):
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass

            busy = [asyncio.create_task(drain(long)) for _ in range(ARGS.slots)]
            while httpx.get(f"{abused}/v1/stats", timeout=30).json()["replicas"][0]["active_slots"] < ARGS.slots:
                await asyncio.sleep(0.05)
            start = time.monotonic()
            async with client.stream("POST", "/v1/completions", json={**BODY, "stream": True}) as r:
                headers_s = time.monotonic() - start
                status, content_type = r.status_code, r.headers["content-type"]
                lines = r.aiter_lines()
                while not (await lines.__anext__()).startswith("data: "):
                    pass
                first_token_s = time.monotonic() - start
                async for _ in lines:
                    pass
            await asyncio.gather(*busy)
        return status, content_type, headers_s, first_token_s

    try:
        status, content_type, headers_s, first_token_s = asyncio.run(scenario())
    finally:
        replica.slow_down.remote(0.0).result()
    assert status == 200 and content_type.startswith("text/event-stream")
    assert headers_s < 1.0 and first_token_s > headers_s + 0.5, (headers_s, first_token_s)
    figures("stream_headers", headers_after_s=round(headers_s, 3), first_token_after_s=round(first_token_s, 3))
