"""One request's chunks on the ingress: the fan-in of its choices' batcher streams, its latency
metrics, and its server-sent events.

A completion request with several choices (prompts x n) makes one streaming batcher call per choice.
`merge_streams` merges them into one stream of chunks in arrival order, but only once every stream
has its first chunk, which for a request the batcher accepted is its `admitted` chunk (no tokens,
sent at once). The merged stream starts with one `ADMITTED` chunk when every choice is in; the
ingress waits for it before it answers, so a refusal (an overload: 503 with Retry-After) or a
rejection of any choice is still an HTTP status, never a broken stream, while a streamed response
starts (status and headers) as soon as the request is admitted, not when a decode slot frees up.
An error chunk, or a failed call, ends the merged stream with the ServeError it maps to (app.errors).
Whatever ends it (the last chunk, an error, or the client going away: Serve then cancels the request
and its consumer here), the calls still running are cancelled, and the batcher frees their requests;
the replica frees their slots at its next step.

`Timing` records time to first token (arrival to the first chunk leaving) and time per output token
of each choice. `sse_events` writes a stream as OpenAI does: one `data:` line per chunk, a usage event
if asked for, then `data: [DONE]`; an error after the response began is reported as one more
`data:` line holding the error body (the status line has gone out already).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from app.completions import CompletionAssembler
from app.errors import as_serve_error, chunk_error, error_body
from app.protocol import Chunk, ServeError

if TYPE_CHECKING:
    from app.metrics import IngressMetrics

ADMITTED = Chunk("", admitted=True)  # the merged stream's first item: every choice was admitted


class ChunkStream(Protocol):
    """One streaming batcher call (Serve's DeploymentResponseGenerator): its chunks, and `cancel()`."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def __anext__(self) -> Chunk: ...

    def cancel(self) -> None: ...


class Timing:
    """Time to first token of a request, and time per output token of each of its choices."""

    def __init__(self, arrived: float, metrics: IngressMetrics, api_name: str):
        """`arrived`: the request's `time.perf_counter()`; `api_name` tags the metrics."""
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
        if chunk.token_ids:  # a choice can end with none (a prompt only scored, EOS first): Counter.inc(0) raises
            self._metrics.output_tokens.inc(len(chunk.token_ids), tags=self._tags)
        if chunk.finished and tokens > 1:
            self._metrics.time_per_output_token.observe((now - first) / (tokens - 1), tags=self._tags)


async def _first_chunk(stream: ChunkStream) -> Chunk:
    try:
        return await stream.__anext__()
    except Exception as e:  # noqa: BLE001
        raise as_serve_error(e) from None


async def _pump(index: int, stream: ChunkStream, queue: asyncio.Queue) -> None:
    """Put `stream`'s chunks, then its failure if it fails, on `queue` as (index, chunk or exception)."""
    try:
        async for chunk in stream:
            queue.put_nowait((index, chunk))
    except Exception as e:  # noqa: BLE001  (re-raised by the consumer)
        queue.put_nowait((index, e))


async def merge_streams(streams: list[ChunkStream], timing: Timing, retry_after_s: float) -> AsyncIterator[Chunk]:
    """`ADMITTED` once every stream has its first chunk, then the chunks of all `streams` (their
    `admitted` chunks left out), merged as they arrive, every stream's first chunk first; raises the
    ServeError of the first error chunk or failed call (503s with `retry_after_s`). On the way out,
    for whatever reason, the streams that have not finished are cancelled."""
    unfinished = set(range(len(streams)))
    queue: asyncio.Queue[tuple[int, Chunk | BaseException]] = asyncio.Queue()
    pumps: list[asyncio.Task] = []
    try:
        firsts = await asyncio.gather(*(_first_chunk(s) for s in streams))
        for chunk in firsts:
            if chunk.error:
                raise chunk_error(chunk, retry_after_s)
        pumps = [asyncio.create_task(_pump(i, s, queue)) for i, s in enumerate(streams) if not firsts[i].finished]
        for i, chunk in enumerate(firsts):
            queue.put_nowait((i, chunk))
        yield ADMITTED
        while unfinished:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise as_serve_error(item)
            if item.error:
                raise chunk_error(item, retry_after_s)
            if item.admitted:
                continue
            if item.finished:
                unfinished.discard(i)
            timing.on_chunk(item)
            yield item
    finally:
        for task in pumps:
            task.cancel()
        for i in unfinished:
            streams[i].cancel()


async def sse_events(assembler: CompletionAssembler, chunks: AsyncIterator[Chunk],
                     include_usage: bool) -> AsyncIterator[str]:
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
