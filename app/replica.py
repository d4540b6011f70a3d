"""The model replica: holds the weights and the engine, runs the continuous-batching loop.

Lifecycle. `__init__` runs its `driver_factory` (by default `load_driver`) on a worker thread: it
loads the checkpoint onto the mesh, builds the paged engine (its KV page pool: `kv_pages` pages of
`page_size` tokens, or what the devices have left after the weights up to `hbm_utilization`) and
compiles every shape (`Engine.warmup`); then the driver's stepping thread starts. Tests pass another
factory (a driver over the mock engine, model/engine/mock.py) to test serving behaviour without a model.
Serve sends no request and counts no health check until `__init__` returns, so the replica is healthy
(and the ingress's readiness route answers 200) only once it is warm. JAX is first imported there,
from `__init__`, and nowhere else in the app: the ingress and batcher never touch an accelerator.

Requests. The batcher calls `generate(batch)` once per prefill batch, as a streaming call. The batch
is handed to the driver in one `submit_many`, so requests that share a prompt bucket are prefilled
together. The driver calls back from its thread; `_OutputBridge` moves the outputs onto this replica's
event loop (`loop.call_soon_threadsafe`, once per step), where `_ChunkBuffer` coalesces the batch's
tokens into chunks. A request's first token and its end leave at once; other tokens leave when a
request has `stream_chunk_tokens` of them or `stream_chunk_ms` after the oldest one arrived. One
yield carries the chunks of every request in the batch, so the stream costs one RPC per chunk
interval, not one per token.

Cancellation. If the batcher cancels the stream (every client of the batch went away), the generator
is closed and cancels its unfinished requests in the driver; their slots are free at the next step.
When only some clients of a batch leave, the batcher broadcasts `cancel(request_id)` to all replicas;
a replica that does not hold the request yet remembers the id, so a cancel that overtakes its batch
still stops it. If the batcher itself dies, Ray does not stop the generators it was reading, and
their requests would hold slots until max_tokens: each batch call names its batcher, and every
CALLER_CHECK_PERIOD_S the replica cancels the requests of batchers that are gone.

Health. `check_health` raises if the driver loop died, or made no step for `stall_timeout_s` while
it had work (a wedged device); Serve restarts the replica after three failures. A stall also fails
the requests the loop holds, at once: Serve stops an unhealthy replica gracefully, which would leave
their clients waiting for graceful_shutdown_timeout_s.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING, AsyncIterator, Callable

from ray import serve

from app.args import AppArgs
from app.autoscaling import HELD_REQUESTS
from app.driver import load_driver
from app.metrics import ReplicaMetrics
from app.protocol import Chunk
from model.serving.request import Limits, Request, RequestRejected

if TYPE_CHECKING:
    from model.serving.driver import Driver
    from model.serving.output import Output

DriverFactory = Callable[[AppArgs, Callable[[int, list[float]], None]], "Driver"]

logger = logging.getLogger("ray.serve")

EARLY_CANCELS_KEPT = 4096  # ids of cancels that arrived before their request; oldest forgotten first
GAUGE_PERIOD_S = 1.0
CALLER_CHECK_PERIOD_S = 2.0


def _actor_alive(name: str) -> bool:
    """Whether the named Serve replica actor (a batcher) still exists: one GCS lookup."""
    import ray

    try:
        ray.get_actor(name, namespace="serve")
    except ValueError:
        return False
    return True


class _OutputBridge:
    """Driver outputs from the stepping thread to the event loop, with one wake-up per step.

    The driver delivers a step's outputs back to back. The one that lands in an empty deque schedules
    a wake-up (`loop.call_soon_threadsafe`); the others only join the deque (appends and pops are
    thread-safe) and are drained with it, so the loop wakes once per step, not once per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._outputs: collections.deque[Output] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, out: "Output") -> None:  # on the driver thread
        self._outputs.append(out)
        if len(self._outputs) == 1:
            try:
                self._loop.call_soon_threadsafe(self._ready.set)
            except RuntimeError:  # the loop is closed: the replica is shutting down
                pass

    async def wait(self, timeout_s: float | None) -> None:
        """Until outputs are waiting or `timeout_s` (None: no limit) has passed."""
        if not self._outputs:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ready.wait()
            except TimeoutError:
                pass
        self._ready.clear()

    def drain(self) -> list["Output"]:
        outputs = []
        while self._outputs:
            outputs.append(self._outputs.popleft())
        return outputs


class _ChunkBuffer:
    """Coalesces one batch's driver outputs into chunks (see the module docstring for when they leave)."""

    def __init__(self, chunk_tokens: int, chunk_s: float):
        self._chunk_tokens = chunk_tokens
        self._chunk_s = chunk_s
        self._pending: dict[str, Chunk] = {}
        self._seen: set[str] = set()
        self._oldest: float | None = None
        self._urgent = False

    def add(self, out: "Output") -> None:
        chunk = self._pending.get(out.request_id)
        if chunk is None:
            chunk = self._pending[out.request_id] = Chunk(out.request_id)
        chunk.token_ids += out.token_ids
        chunk.logprobs += out.logprobs
        chunk.text += out.text
        if out.top_logprobs is not None:
            chunk.top_logprobs = (chunk.top_logprobs or []) + out.top_logprobs
        if out.prompt_logprobs is not None:
            chunk.prompt_logprobs, chunk.prompt_top_logprobs = out.prompt_logprobs, out.prompt_top_logprobs
        if out.finished:
            chunk.finish_reason = out.finish_reason
            chunk.error = out.error
            chunk.score = out.score
            chunk.beams = out.beams
        first = out.request_id not in self._seen
        self._seen.add(out.request_id)
        self._urgent |= first or out.finished or len(chunk.token_ids) >= self._chunk_tokens
        if self._oldest is None:
            self._oldest = time.monotonic()

    def wait_s(self) -> float | None:
        """Seconds until the buffer is due (0: now); None when it is empty."""
        if self._oldest is None:
            return None
        if self._urgent:
            return 0.0
        return max(0.0, self._oldest + self._chunk_s - time.monotonic())

    def take(self) -> list[Chunk]:
        chunks = list(self._pending.values())
        self._pending.clear()
        self._oldest = None
        self._urgent = False
        return chunks


@serve.deployment(graceful_shutdown_timeout_s=120, health_check_period_s=10, health_check_timeout_s=30)
class Replica:
    """One engine on one mesh (a TPU v5e host on GKE, the CPU locally). See the module docstring."""

    async def __init__(self, args: AppArgs, driver_factory: DriverFactory = load_driver):
        self._args = args
        self._open: dict[str, int] = {}  # request ids this replica is generating -> their sequences (beams)
        self._by_caller: dict[str, set[str]] = {}  # batcher replica (actor name) -> its open request ids
        self._early_cancels: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._cancelled_slots = 0  # requests the driver stopped because we cancelled them
        self._metrics = ReplicaMetrics()
        self._driver = await asyncio.to_thread(driver_factory, args, self._on_prefill)
        self._driver.start()
        self._gauges = asyncio.get_running_loop().create_task(self._update_gauges())
        self._orphan_reaper = asyncio.get_running_loop().create_task(self._cancel_orphans())

    # -- requests -------------------------------------------------------------------------------

    async def generate(self, batch: list[Request], caller: str | None = None) -> AsyncIterator[list[Chunk]]:
        """Generate a prefill batch; yields lists of chunks until every request in it has finished.
        `caller` is the calling batcher's actor name (its requests are cancelled if it dies)."""
        bridge = _OutputBridge(asyncio.get_running_loop())

        def deliver(out: "Output") -> None:  # on the driver thread: must never raise
            if out.finish_reason == "cancelled":
                self._cancelled_slots += 1
            bridge.put(out)

        rejected, items = [], []
        for request in batch:
            if request.request_id in self._early_cancels:  # its client left before the batch got here
                del self._early_cancels[request.request_id]
                continue
            try:
                self._driver.validate(request)
            except RequestRejected as e:
                rejected.append(Chunk(request.request_id, finish_reason="error", error=str(e), error_status=400,
                                      error_param=e.param))
                continue
            items.append((request, deliver))
        try:
            self._driver.submit_many(items)
        except RuntimeError as e:  # the engine loop has failed: Serve is about to replace this replica
            unavailable = f"model replica unavailable ({e}); retry"
            yield rejected + [Chunk(request.request_id, finish_reason="error", error=unavailable, error_status=503)
                              for request, _ in items]
            return
        submitted = {request.request_id for request, _ in items}
        open_ids = set(submitted)  # shrinks as requests finish
        self._open.update((request.request_id, request.num_beams) for request, _ in items)
        if caller is not None:
            self._by_caller.setdefault(caller, set()).update(submitted)
        buffer = _ChunkBuffer(self._args.stream_chunk_tokens, self._args.stream_chunk_ms / 1000)
        try:
            if rejected:
                yield rejected
            while open_ids:
                await bridge.wait(buffer.wait_s())
                for out in bridge.drain():
                    buffer.add(out)
                    if out.finished:
                        open_ids.discard(out.request_id)
                if buffer.wait_s() == 0:
                    yield buffer.take()
            if buffer.wait_s() is not None:
                yield buffer.take()
        finally:
            for request_id in open_ids:  # the batcher went away: free the slots
                self._driver.cancel(request_id)
            for request_id in submitted:
                self._open.pop(request_id, None)
            if self._by_caller.get(caller):
                self._by_caller[caller] -= submitted
                if not self._by_caller[caller]:
                    del self._by_caller[caller]

    def cancel(self, request_id: str) -> None:
        """Stop one request (broadcast by the batcher when its client left); unknown ids are remembered."""
        if request_id in self._open:
            self._driver.cancel(request_id)
            return
        self._early_cancels[request_id] = None
        while len(self._early_cancels) > EARLY_CANCELS_KEPT:
            self._early_cancels.popitem(last=False)

    # -- introspection ----------------------------------------------------------------------------

    def info(self) -> Limits:
        """The engine's limits, which the ingress checks every request against before sending it."""
        return self._driver.engine.limits

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric: the requests this replica holds (decoding or waiting
        for a slot), a beam search counting each of its beams (each takes a decode slot), which
        app.autoscaling scales on."""
        return {HELD_REQUESTS: float(sum(self._open.values()))}

    def stats(self) -> dict:
        """The engine loop's counters (prefill batches and rows, decode steps, tokens out, preemptions)
        and state (slots, waiting requests, KV pages total / used / free and the fraction used)."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "active_slots": self._driver.active_slots,
            "waiting": self._driver.waiting,
            "cancelled": self._cancelled_slots,
            "compilations_since_warmup": self._driver.engine.compilations_since_warmup,
            "warmup_seconds": self._driver.engine.warmup_seconds,
            **self._driver.kv_usage(),
            **dict.fromkeys(("prefill_batches", "prefill_rows", "prefill_chunks", "decode_steps", "tokens_out",
                             "preemptions", "prefix_cache_queries", "prefix_cache_hits"), 0),
            **self._driver.stats,
        }

    def check_health(self) -> None:
        driver = self._driver
        if driver.error is not None:
            raise RuntimeError(f"engine loop failed: {type(driver.error).__name__}: {driver.error}")
        idle = time.monotonic() - driver.last_step_at
        if idle > self._args.stall_timeout_s:
            stalled = RuntimeError(
                f"engine loop made no step for {idle:.0f}s (stall_timeout_s={self._args.stall_timeout_s})"
            )
            # End what the wedged loop holds now: Serve stops an unhealthy replica gracefully, so its
            # requests would otherwise hang for graceful_shutdown_timeout_s before failing.
            driver.fail_all(stalled)
            raise stalled

    # -- metrics ----------------------------------------------------------------------------------

    def _on_prefill(self, bucket: int, waited_s: list[float]) -> None:  # on the driver thread
        self._metrics.prefill_batch_size.observe(len(waited_s), tags={"bucket": str(bucket)})
        for w in waited_s:
            self._metrics.queue_time.observe(w)

    async def _cancel_orphans(self) -> None:
        """Cancel the requests of batchers that died (see the module docstring, Cancellation)."""
        while True:
            await asyncio.sleep(CALLER_CHECK_PERIOD_S)
            for caller in list(self._by_caller):
                if await asyncio.to_thread(_actor_alive, caller):
                    continue
                orphans = self._by_caller.pop(caller, set())
                logger.warning(f"{caller} is gone: cancelling the {len(orphans)} requests it left here")
                for request_id in orphans:
                    self._driver.cancel(request_id)

    async def _update_gauges(self) -> None:
        slots = self._driver.engine.max_concurrent_decodes
        counted = collections.Counter()  # what the Prometheus counters have been given so far
        counters = {"preemptions": self._metrics.preemptions, "prefix_cache_queries": self._metrics.prefix_cache_queries,
                    "prefix_cache_hits": self._metrics.prefix_cache_hits}
        while True:
            active = self._driver.active_slots
            self._metrics.slots_active.set(active)
            self._metrics.slot_occupancy.set(active / slots)
            self._metrics.waiting.set(self._driver.waiting)
            kv = self._driver.kv_usage()
            self._metrics.kv_pages_used.set(kv["kv_pages_used"])
            self._metrics.kv_pages_free.set(kv["kv_pages_free"])
            self._metrics.kv_cache_usage.set(kv["kv_cache_usage_perc"])
            for name, counter in counters.items():  # each counter moves by what this period added
                now = self._driver.stats.get(name, 0)
                if now > counted[name]:
                    counter.inc(now - counted[name])
                    counted[name] = now
            self._metrics.compilations.set(self._driver.engine.compilations_since_warmup or 0)
            await asyncio.sleep(GAUGE_PERIOD_S)
