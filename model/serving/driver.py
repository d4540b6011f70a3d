"""The driver: the loop that owns the engine's decode slots and turns requests into token streams.

Request lifecycle:
  submit()  validates the request (clear `RequestRejected` errors, nothing truncated) and queues it;
  step()    1. drops cancelled requests (a cancelled slot is free from this step on),
            2. admits waiting requests: the oldest waiting request picks the prompt bucket, up to
               (free slots, largest batch bucket) requests of that bucket are prefilled together
               and inserted into free slots while the other slots keep their state,
            3. runs one decode step for all slots and hands each live request its token;
  a request ends at a stop token, a stop string, EOS (when asked) or max_tokens, and its slot is free
  for the next step's admissions (continuous batching).

Outputs are delivered through the callback given to `submit`, from the thread that runs `step()`;
each `Output` carries the new token ids, their logprobs and the new text. Text is detokenised
incrementally (never half a UTF-8 character) and held back while it could still be the start of a
stop string, so a stop string never reaches the client.

The driver is used synchronously (`generate`, for the CLI and tests) or from its own thread
(`start`/`stop`, for a server). It imports nothing from Ray.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import threading
import time
from typing import Callable, Sequence

import jax
import numpy as np

from model.engine.dense import Engine, RequestRejected
from model.serving.request import Request
from model.engine.sampling import SamplingParams
from model.text.tokenizer import IncrementalDetokenizer, Tokenizer

_seed_source = random.SystemRandom()
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # sampling settings travel to the device as float32


@dataclasses.dataclass
class Output:
    request_id: str
    token_ids: list[int]  # new since the previous Output of this request
    logprobs: list[float]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


@dataclasses.dataclass
class Result:
    """A whole generation, as `Driver.generate` returns it."""

    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str


@dataclasses.dataclass
class _Live:
    request: Request
    on_output: Callable[[Output], None]
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]
    submitted_at: float
    text: str = ""  # all text so far (complete characters)
    sent_chars: int = 0  # how much of `text` has been delivered
    n_tokens: int = 0
    slot: int | None = None


class Driver:
    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        max_waiting: int | None = None,
        on_prefill: Callable[[int, list[float]], None] | None = None,
    ):
        """`on_prefill(prompt_bucket, waited_seconds)`, if given, is called from the stepping thread
        after each prefill batch, with how long each of its requests waited since `submit` (for a
        server's queue-time and batch-size metrics)."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        self.on_prefill = on_prefill
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Live] = collections.deque()
        self._cancelled: set[str] = set()
        self._live_ids: set[str] = set()  # waiting or decoding
        self._slots: list[_Live | None] = [None] * engine.max_concurrent_decodes
        self._state = engine.init_decode_state()
        self._in_flight = None  # (StepOutput, slot owners) of the decode step dispatched last
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.last_step_at = time.monotonic()  # heartbeat for health checks
        self.stats = collections.Counter()  # prefill_batches, prefill_rows, decode_steps, tokens_out, ...

    # -- requests -------------------------------------------------------------------------------

    def validate(self, r: Request) -> None:
        """Raise RequestRejected naming the problem; a request that passes can be served as asked."""
        cfg = self.engine.cfg
        if len(r.prompt_ids) == 0:
            raise RequestRejected("prompt is empty")
        bad = [t for t in r.prompt_ids if not (isinstance(t, (int, np.integer)) and 0 <= t < cfg.vocab_size)]
        if bad:
            raise RequestRejected(f"prompt token id {bad[0]!r} is outside the vocabulary [0, {cfg.vocab_size})")
        if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be a positive integer, got {r.max_tokens!r}")
        self.engine.prompt_bucket(len(r.prompt_ids))  # raises when too long for every bucket
        total = len(r.prompt_ids) + r.max_tokens
        if total > self.engine.max_total_length:
            raise RequestRejected(
                f"prompt ({len(r.prompt_ids)} tokens) + max_tokens ({r.max_tokens}) = {total} exceeds the "
                f"context limit of {self.engine.max_total_length} tokens"
            )
        if not r.temperature >= 0:  # also catches NaN
            raise RequestRejected(f"temperature must be >= 0, got {r.temperature}")
        if r.temperature > _FLOAT32_MAX:  # inf in float32: the sampler would divide the logits into NaNs
            raise RequestRejected(f"temperature must be at most {_FLOAT32_MAX:.3g} (float32), got {r.temperature}")
        if not 0 < r.top_p <= 1:
            raise RequestRejected(f"top_p must be in (0, 1], got {r.top_p}")
        if not 0 <= r.top_k < 2**31:
            raise RequestRejected(f"top_k must be in [0, 2**31), got {r.top_k}")
        if r.seed is not None and not 0 <= r.seed < 2**31:  # the engine holds seeds as int32
            raise RequestRejected(f"seed must be in [0, 2**31), got {r.seed}")

    def submit(self, request: Request, on_output: Callable[[Output], None]) -> str:
        """Queue a request; outputs arrive through `on_output` from the stepping thread."""
        return self.submit_many([(request, on_output)])[0]

    def submit_many(self, items: Sequence[tuple[Request, Callable[[Output], None]]]) -> list[str]:
        """Queue several requests at once, so the next admission sees them together: those that share
        a prompt bucket are prefilled in one batch (a server's batcher hands over whole batches).
        All are validated first; if one is rejected, none is queued."""
        for request, _ in items:
            self.validate(request)
        lives = []
        for request, on_output in items:
            stop_ids = set(request.stop_token_ids)
            if request.stop_at_eos:
                stop_ids.add(self.engine.cfg.eos_token_id)
            detok = self.tokenizer.detokenizer()
            lives.append(_Live(request, on_output, detok, frozenset(stop_ids), time.monotonic()))
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"engine loop has failed: {self.error}")
            if self.max_waiting is not None and len(self._waiting) + len(lives) > self.max_waiting:
                raise OverflowError(f"{len(self._waiting)} requests already waiting (limit {self.max_waiting})")
            ids = [live.request.request_id for live in lives]
            clash = next((i for n, i in enumerate(ids) if i in self._live_ids or i in ids[:n]), None)
            if clash is not None:  # ids address cancellation: two live requests may not share one
                raise RequestRejected(f"request_id {clash!r} is already in flight")
            self._waiting.extend(lives)
            self._live_ids.update(ids)
            self._lock.notify()
        return [request.request_id for request, _ in items]

    def cancel(self, request_id: str) -> None:
        """Stop a request; its slot is free at the next step. Unknown or finished ids are ignored."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify()

    @property
    def active_slots(self) -> int:
        return sum(s is not None for s in self._slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.active_slots > 0 or bool(self._cancelled) or self._in_flight is not None

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> None:
        """Cancel, admit one prefill batch, dispatch one decode step, then hand out the tokens of the
        step before it. Call from one thread only.

        Pipelining: the device computes step k while the host reads step k-1's tokens and does the
        per-request bookkeeping (stops, detokenisation, delivery). Each dispatched step remembers
        which request owned each slot; a token is delivered only if that request still owns the
        slot, so a request that finished or was cancelled in between costs one wasted slot-step."""
        self.last_step_at = time.monotonic()
        self._apply_cancellations()
        self._admit()
        previous, self._in_flight = self._in_flight, None
        if self.active_slots:
            self._state, out = self.engine.generate(self._state)
            self._in_flight = (out, list(self._slots))
            self.stats["decode_steps"] += 1
        if previous is not None:
            out, owners = previous
            tokens, logprobs = jax.device_get((out.tokens, out.logprobs))
            for slot, live in enumerate(owners):
                if live is not None and live.slot == slot:
                    self._accept(live, int(tokens[slot]), float(logprobs[slot]))

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
            if not cancelled:
                return
            kept = collections.deque()
            for live in self._waiting:
                (self._finish(live, "cancelled") if live.request.request_id in cancelled else kept.append(live))
            self._waiting = kept
        for live in self._slots:
            if live is not None and live.request.request_id in cancelled:
                self._finish(live, "cancelled")

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self._slots) if s is None]
        with self._lock:
            if not free or not self._waiting:
                return
            bucket = self.engine.prompt_bucket(len(self._waiting[0].request.prompt_ids))
            limit = min(len(free), self.engine.config.batch_buckets[-1])
            batch, kept = [], collections.deque()
            for live in self._waiting:
                fits = len(batch) < limit and self.engine.prompt_bucket(len(live.request.prompt_ids)) == bucket
                (batch if fits else kept).append(live)
            self._waiting = kept
        admitted_at = time.monotonic()
        reqs = [live.request for live in batch]
        seeds = [_seed_source.randrange(2**31) if r.seed is None else r.seed for r in reqs]
        params = SamplingParams.host(
            [r.temperature for r in reqs], [r.top_k for r in reqs], [r.top_p for r in reqs], seeds
        )
        prefix = self.engine.prefill([list(r.prompt_ids) for r in reqs], params)
        slots = free[: len(batch)]
        self._state = self.engine.insert(prefix, self._state, slots)
        self.stats["prefill_batches"] += 1
        self.stats["prefill_rows"] += len(batch)
        if self.on_prefill is not None:
            self.on_prefill(bucket, [admitted_at - live.submitted_at for live in batch])
        tokens, logprobs = jax.device_get((prefix.tokens, prefix.logprobs))
        for row, (live, slot) in enumerate(zip(batch, slots)):
            live.slot = slot
            self._slots[slot] = live
            self._accept(live, int(tokens[row]), float(logprobs[row]))

    def _accept(self, live: _Live, token: int, logprob: float) -> None:
        r = live.request
        if token in live.stop_ids:
            self._finish(live, "stop")
            return
        live.n_tokens += 1
        self.stats["tokens_out"] += 1
        live.text += live.detok.push(token)
        reason = None
        if r.stop:
            # Only the tail can hold a new match: it must end in text added by this token.
            longest = max(len(s) for s in r.stop)
            start = max(0, live.sent_chars - longest)
            hits = [i for i in (live.text.find(s, start) for s in r.stop) if i >= 0]
            if hits:
                live.text = live.text[: min(hits)]
                reason = "stop"
        if reason is None and live.n_tokens >= r.max_tokens:
            live.text += live.detok.flush()
            reason = "length"
        if reason is not None:
            self._finish(live, reason, [token], [logprob])
            return
        hold = max((len(s) for s in r.stop), default=1) - 1
        safe = max(live.sent_chars, len(live.text) - hold)
        self._emit(live, Output(r.request_id, [token], [logprob], live.text[live.sent_chars : safe]))
        live.sent_chars = safe

    def _finish(self, live: _Live, reason: str, token_ids=(), logprobs=(), error: str | None = None) -> None:
        if live.slot is not None:
            self._slots[live.slot] = None
            live.slot = None
        text = live.text[live.sent_chars :]
        live.sent_chars = len(live.text)
        with self._lock:
            self._live_ids.discard(live.request.request_id)
        self._emit(live, Output(live.request.request_id, list(token_ids), list(logprobs), text, True, reason, error))

    @staticmethod
    def _emit(live: _Live, output: Output) -> None:
        live.on_output(output)

    def fail_all(self, error: BaseException) -> None:
        """Finish every waiting and active request with an error (the engine cannot go on)."""
        with self._lock:
            self.error = error
            waiting, self._waiting = list(self._waiting), collections.deque()
        for live in waiting + [s for s in self._slots if s is not None]:
            self._finish(live, "error", error=f"{type(error).__name__}: {error}")

    # -- synchronous use ------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run `requests` to completion on this thread; results in input order."""
        outputs: dict[str, list[Output]] = {}
        for r in requests:
            outputs[r.request_id] = []
            self.submit(r, outputs[r.request_id].append)
        while self.has_work():
            self.step()
        results = []
        for r in requests:
            outs = outputs[r.request_id]
            results.append(Result(
                request_id=r.request_id,
                prompt_ids=list(r.prompt_ids),
                token_ids=[t for o in outs for t in o.token_ids],
                logprobs=[lp for o in outs for lp in o.logprobs],
                text="".join(o.text for o in outs),
                finish_reason=outs[-1].finish_reason,
            ))
        return results

    # -- background thread ----------------------------------------------------------------------

    def start(self) -> None:
        """Step on a daemon thread whenever there is work (for servers)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="gptj-driver", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.has_work():
                    self.last_step_at = time.monotonic()
                    self._lock.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # the engine is broken: fail loudly, never hang callers
                self.fail_all(e)
                return
