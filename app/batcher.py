"""The dynamic batcher: gathers requests from every ingress replica into prefill batches for the replicas.

Batching. The engine pads each prompt to the smallest prompt bucket that holds it, and one prefill
runs one bucket, so requests are grouped by bucket. A group goes to a model replica when it holds
`batch_max_size` sequences (a request counts one per beam: a beam search of 4 takes 4 decode slots),
or `batch_wait_ms` after its first request arrived, whichever comes first
(Saxml's batch wait). The whole group travels as one call, and the replica submits it to its engine
in one piece, so it is prefilled as one batch. Decoding is continuous inside the replica: a batch
joins the running slots without waiting for them, and its requests leave one by one as they finish.

Admission control. The batcher holds at most `max_pending_requests` sequences (forming a batch,
waiting for a slot, or decoding; a request counts one per beam, as it will hold that many decode
slots). A request that would take it beyond is refused at once: its stream is a single
error chunk marked `overloaded`, which the ingress turns into `Overloaded` (HTTP 503 with
Retry-After). A chunk, not an exception: Serve logs every exception raised across a deployment
boundary with its traceback, which under overload meant hundreds of tracebacks a second, written
when the CPU is scarcest. There is no unbounded queue anywhere on the path.

Relay. A batch's call to the replica streams lists of chunks, each list covering every request of the
batch that advanced; the batcher routes each chunk to its request's queue, and each request's stream
hands its chunks to the ingress. Chunks hold several tokens (see app.replica), so no hop pays one RPC
per token.

Failures. If the replica dies under a batch, every unfinished request of the batch ends with an error
chunk of status 503 (the ingress adds Retry-After: the request can be sent again, and Serve is
replacing the replica); any other failure of the call ends them with a 500 that names it.

Cancellation. When a client goes away, Serve cancels its stream here. A request still forming a batch
just leaves the group. If every unfinished request of a dispatched batch is gone, the batch's call is
cancelled and the replica frees their slots; otherwise the batcher broadcasts `cancel(request_id)` to
the replicas (one of them holds it). Batch calls run in a fresh `contextvars.Context`: Serve cancels
the calls a request made when that request is cancelled, and a batch serves several requests, so it
must not belong to the one whose arrival happened to dispatch it.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import logging
from typing import AsyncIterator

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from app.args import AppArgs
from app.metrics import BatcherMetrics
from app.protocol import Chunk, describe
from model.engine.buckets import smallest_fitting
from model.serving.request import Limits, Request

logger = logging.getLogger("ray.serve")


@dataclasses.dataclass(eq=False)
class _Pending:
    """One request in the batcher: its chunk queue and the batch it joined."""

    request: Request
    chunks: asyncio.Queue[Chunk] = dataclasses.field(default_factory=asyncio.Queue)
    batch: "_Batch | None" = None
    done: bool = False  # its last chunk went out, or its client left


def sequences(request: Request) -> int:
    """The decode slots `request` will hold: one per beam."""
    return request.num_beams


@dataclasses.dataclass(eq=False)
class _Batch:
    members: dict[str, _Pending]
    unfinished: set[str]  # requests still waiting for their last chunk, whose clients are still there
    response: DeploymentResponseGenerator | None = None


@serve.deployment
class Batcher:
    """Forms prefill batches by prompt bucket and relays their chunks (see the module docstring)."""

    def __init__(self, replica: DeploymentHandle, args: AppArgs):
        self._replica = replica
        self._replica_generate = replica.options(method_name="generate", stream=True)
        # This replica's actor name: replicas cancel what it left them if it dies.
        self._name = serve.get_replica_context().replica_id.to_full_id_str()
        self._args = args
        self._forming: dict[int, list[_Pending]] = {}  # prompt bucket -> requests waiting for their batch
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._held = 0  # sequences (a request's beams) admitted and not yet done
        self._tasks: set[asyncio.Task] = set()
        self._counts = collections.Counter(batches=0, batched_requests=0, rejected=0)
        self._metrics = BatcherMetrics()

    async def generate(self, request: Request) -> AsyncIterator[Chunk]:
        """Stream one request's chunks, starting with an `admitted` one at once (so the ingress can
        answer a stream before a decode slot is free); a single `overloaded` error chunk instead when
        its sequences would take the held ones beyond `max_pending_requests`."""
        held = sequences(request)
        if held > self._args.max_pending_requests:  # could never be admitted: not an overload
            yield Chunk(request.request_id, finish_reason="error", error_status=400, error_param="num_beams", error=(
                f"num_beams={held} exceeds the sequences this server holds at once "
                f"(max_pending_requests={self._args.max_pending_requests})"))
            return
        if self._held + held > self._args.max_pending_requests:
            self._counts["rejected"] += 1
            self._metrics.rejected.inc()
            yield Chunk(request.request_id, finish_reason="error", error_status=503, overloaded=True, error=(
                f"the server holds {self._held} sequences and this request needs {held} "
                f"(max_pending_requests={self._args.max_pending_requests}); retry later"))
            return
        pending = _Pending(request)
        self._held += held
        self._metrics.pending.set(self._held)
        try:
            self._enqueue(pending)
            yield Chunk(request.request_id, admitted=True)
            while not pending.done:
                chunk = await pending.chunks.get()
                pending.done = chunk.finished
                yield chunk
        finally:
            self._held -= held
            self._metrics.pending.set(self._held)
            if not pending.done:
                self._abandon(pending)

    # -- batch formation --------------------------------------------------------------------------

    def _bucket(self, prompt_len: int) -> int:
        """The engine's bucket selection (a prompt longer than every bucket was refused by the ingress;
        the replica would refuse it too)."""
        return smallest_fitting(prompt_len, self._args.prompt_buckets) or self._args.prompt_buckets[-1]

    def _enqueue(self, pending: _Pending) -> None:
        bucket = self._bucket(len(pending.request.prompt_ids))
        group = self._forming.setdefault(bucket, [])
        group.append(pending)
        if sum(sequences(p.request) for p in group) >= self._args.batch_max_size:
            self._dispatch(bucket)
        elif len(group) == 1:
            self._timers[bucket] = asyncio.get_running_loop().call_later(
                self._args.batch_wait_ms / 1000, self._dispatch, bucket, context=contextvars.Context()
            )

    def _dispatch(self, bucket: int) -> None:
        timer = self._timers.pop(bucket, None)
        if timer is not None:
            timer.cancel()
        group = self._forming.pop(bucket, [])
        if not group:
            return
        batch = _Batch({p.request.request_id: p for p in group}, {p.request.request_id for p in group})
        for p in group:
            p.batch = batch
        self._counts["batches"] += 1
        self._counts["batched_requests"] += len(group)
        self._metrics.batch_size.observe(len(group))
        self._spawn(self._run(batch))

    def _spawn(self, coro) -> None:
        """A background task outside any request's context (see the module docstring)."""
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: _Batch) -> None:
        """Call a replica for the batch and route its chunks; a failure ends every unfinished request."""
        if not batch.unfinished:
            return  # every client left before the batch went out
        batch.response = self._replica_generate.remote([p.request for p in batch.members.values()], self._name)
        error: Chunk | None = None
        try:
            async for chunks in batch.response:
                for chunk in chunks:
                    member = batch.members.get(chunk.request_id)
                    if member is None or member.done:
                        continue
                    if chunk.finished:
                        batch.unfinished.discard(chunk.request_id)
                    member.chunks.put_nowait(chunk)
        except BackPressureError as e:
            error = Chunk("", finish_reason="error", error=f"model replicas are saturated ({e}); retry later",
                          error_status=503)
        except RayActorError as e:  # the replica died: its requests may be sent again (503, Retry-After)
            logger.warning(f"batch of {len(batch.members)} lost with its replica: {describe(e)}")
            error = Chunk("", finish_reason="error", error=f"model replica failed ({describe(e)}); retry",
                          error_status=503)
        except Exception as e:  # noqa: BLE001  (the replica raised, or the batch was cancelled)
            if batch.unfinished:
                logger.warning(f"batch of {len(batch.members)} failed: {describe(e)}")
            error = Chunk("", finish_reason="error", error=f"model replica failed: {describe(e)}")
        if batch.unfinished and error is None:
            error = Chunk("", finish_reason="error", error="model replica ended the batch early")
        for request_id in batch.unfinished:
            batch.members[request_id].chunks.put_nowait(dataclasses.replace(error, request_id=request_id))

    # -- cancellation ------------------------------------------------------------------------------

    def _abandon(self, pending: _Pending) -> None:
        """The client of `pending` went away before its last chunk: free what it holds."""
        pending.done = True
        request_id = pending.request.request_id
        batch = pending.batch
        if batch is None:  # still forming: just leave the group
            bucket = self._bucket(len(pending.request.prompt_ids))
            group = self._forming.get(bucket, [])
            if pending in group:
                group.remove(pending)
            return
        batch.unfinished.discard(request_id)
        if batch.response is None:
            return  # _run will see who is left before it calls a replica
        if not batch.unfinished:
            batch.response.cancel()  # the replica's generator cancels its requests
        else:
            self._spawn(self._broadcast_cancel(request_id))

    async def _broadcast_cancel(self, request_id: str) -> None:
        try:
            await self._replica.broadcast("cancel", request_id).results_async(return_exceptions=True)
        except Exception as e:  # noqa: BLE001  (best effort: the request ends at max_tokens anyway)
            logger.warning(f"could not cancel {request_id}: {type(e).__name__}: {e}")

    # -- introspection ------------------------------------------------------------------------------

    async def info(self) -> Limits:
        """The engine's limits, from a warm replica (waits for one)."""
        return await self._replica.info.remote()

    async def stats(self) -> dict:
        """This batcher's counters and every replica's engine counters."""
        replicas = await self._replica.broadcast("stats").results_async()
        return {"batcher": {"held": self._held, **self._counts}, "replicas": replicas}
