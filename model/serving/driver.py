"""The driver: the loop that runs an engine for a stream of requests.

Request lifecycle:
  submit()  checks the request against the engine's limits (clear `RequestRejected` errors, nothing
            truncated) and queues it with the scheduler;
  step()    1. asks the scheduler for this step's plan (model.serving.scheduler): cancelled requests
               leave (a cancelled slot and its pages are free from this step on), every decoding
               request gets the KV pages its next token needs (preempting the youngest when the pool
               is full: it is requeued and later recomputed, its output unchanged), and one prefill
               batch of waiting requests of one bucket is admitted into free slots and pages;
            2. runs the plan on the engine: prefill + insert while the other slots keep their state,
               then one decode step for all slots, over the scheduler's page tables;
            3. hands each live request its token: output processing (model.serving.output) turns it
               into text and decides whether the request has ended;
  a request ends at a stop token, a stop string, EOS (when asked) or max_tokens; the driver then tells
  the scheduler (its slot is free for the next step's admissions: continuous batching) and the
  engine (`free_resource`).

Beam search (`Request.num_beams` > 1, model.serving.beams): a beam request holds a slot per beam;
after its prefill and after every decode step the driver runs its beam step on the slots' most
likely tokens, then forks the beams' slots (the scheduler's pages, the engine's state) so that each
slot continues the beam it now holds. Its next step needs those tokens, so a step holding beams is
collected before the next is dispatched (no pipelining while beams decode). A beam request
delivers one Output when it ends: the best beam, its score and every finished beam.

Outputs are delivered through the callback given to `submit`, from the thread that runs `step()`;
each `Output` carries the new token ids, their logprobs and the new text. A request with
`prompt_logprobs` has its prompt scored by its first prefill (every chunk of it, when chunked; never
again by a recompute after preemption) and the scores go out with its first Output. The driver never writes
into a caller's `Request` (a request without a seed gets one in the scheduler's own record).

The driver is used synchronously (`generate`, for the CLI and tests) or from its own thread
(`start`/`stop`, for a server). It imports nothing from Ray and works with any `model.engine.api.Engine`.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable, Sequence

import jax

from model.engine.api import Engine, PoolPrefix, Sampled
from model.engine.sampling import SamplingParams
from model.serving.beams import BeamSearch
from model.serving.output import Beam, Output, OutputStream, Result
from model.serving.request import Request
from model.serving.scheduler import PrefillBatch, PrefillChunk, Scheduled, Scheduler
from model.text.tokenizer import Tokenizer

OnOutput = Callable[[Output], None]


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
        self.on_prefill = on_prefill
        self._scheduler = Scheduler(engine.limits, engine.page_layout, engine.max_concurrent_decodes,
                                    engine.max_prefill_batch, engine.prefill_buckets, max_waiting,
                                    engine.prefill_chunk_tokens, engine.prefix_caching)
        self._lock = threading.Condition()  # guards the scheduler; wakes the stepping thread
        self._streams: dict[str, tuple[OutputStream, OnOutput]] = {}  # by request id
        self._state = engine.init_decode_state()
        self._in_flight: tuple[Sampled, list[tuple[Scheduled, int] | None]] | None = None  # the last decode step
        self._beams: dict[str, BeamSearch] = {}  # by request id: the beam requests decoding
        self._scored: dict[str, tuple[list, list]] = {}  # prompt scores of chunked prompts, chunk by chunk
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        self.last_step_at = time.monotonic()  # heartbeat for health checks
        self.stats = collections.Counter()  # prefill_batches, prefill_rows, prefill_chunks, decode_steps,
        #                                     tokens_out, preemptions, prefix_cache_queries / _hits

    # -- requests -------------------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        """Raise RequestRejected naming the problem; a request that passes can be served as asked."""
        self.engine.limits.check(request)

    def submit(self, request: Request, on_output: OnOutput) -> str:
        """Queue a request; outputs arrive through `on_output` from the stepping thread."""
        return self.submit_many([(request, on_output)])[0]

    def submit_many(self, items: Sequence[tuple[Request, OnOutput]]) -> list[str]:
        """Queue several requests at once, so the next admission sees them together: those that share
        a prompt bucket are prefilled in one batch (a server's batcher hands over whole batches).
        All are checked first; if one is rejected, none is queued."""
        for request, _ in items:
            self.validate(request)
        with self._lock:
            if self.error is not None:
                raise RuntimeError(f"engine loop has failed: {self.error}")
            self._scheduler.add([request for request, _ in items], time.monotonic())
            for request, on_output in items:
                stream = OutputStream(request, self.tokenizer, self.engine.eos_token_id)
                self._streams[request.request_id] = (stream, on_output)
            self._lock.notify()
        return [request.request_id for request, _ in items]

    def cancel(self, request_id: str) -> None:
        """Stop a request; its slot is free at the next step. Unknown or finished ids are ignored."""
        with self._lock:
            self._scheduler.cancel(request_id)
            self._lock.notify()

    @property
    def active_slots(self) -> int:
        return self._scheduler.active_slots

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting

    def has_work(self) -> bool:
        return self._scheduler.has_work() or self._in_flight is not None

    def kv_usage(self) -> dict:
        """KV pages total / used / free, the fraction in use (`kv_cache_usage_perc`; cached pages
        nobody holds count as free) and the pages the prefix cache holds."""
        with self._lock:
            return self._scheduler.kv_usage()

    # -- the loop -------------------------------------------------------------------------------

    def step(self) -> None:
        """Run one plan: cancel, admit one prefill batch, dispatch one decode step, then hand out the
        tokens of the step before it. Call from one thread only.

        Pipelining: the device computes step k while the host reads step k-1's tokens and does the
        per-request bookkeeping (stops, detokenisation, delivery). Each dispatched step remembers
        which admission of which request owned each slot; a token is delivered only if that
        admission still owns the slot, so a request that finished, was cancelled or was preempted in
        between costs one wasted slot-step (a preempted one recomputes that token)."""
        self.last_step_at = time.monotonic()
        if self._in_flight is not None and any(o is not None and o[0].beams > 1 for o in self._in_flight[1]):
            self._collect(self._in_flight)  # beams fork on its tokens before the next step runs
            self._in_flight = None
        with self._lock:
            plan = self._scheduler.schedule()
        for slot in plan.freed_slots:
            self.engine.free_resource(slot)
        for s in plan.cancelled + plan.preempted:  # a preempted beam request starts its search again
            self._beams.pop(s.request_id, None)
        for s in plan.cancelled:
            self._deliver(s, self._stream(s).end("cancelled"))
        self.stats["preemptions"] = self._scheduler.preemptions
        self.stats["prefix_cache_queries"] = self._scheduler.prefix_cache_queries  # prompt tokens, as vLLM counts
        self.stats["prefix_cache_hits"] = self._scheduler.prefix_cache_hits
        if plan.prefill is not None:
            self._prefill(plan.prefill)
        if plan.chunk is not None:
            self._prefill_chunk(plan.chunk)
        previous, self._in_flight = self._in_flight, None
        if self._scheduler.decoding_slots:
            self._state, out = self.engine.generate(self._state, self._scheduler.pages)
            self._scheduler.decoded()
            owners = [None if s is None else (s, s.admission) for s in self._scheduler.slot_owners()]
            self._in_flight = (out, owners)
            self.stats["decode_steps"] += 1
        if previous is not None:
            self._collect(previous)

    def _collect(self, step: tuple[Sampled, list[tuple[Scheduled, int] | None]]) -> None:
        """Hand out a decode step's tokens to the admissions that still own their slots; beam
        requests take a beam step each on their slots' candidates, and fork."""
        out, owners = step
        tokens, logprobs, top_tokens, top_logprobs = jax.device_get(
            (out.tokens, out.logprobs, out.top_tokens, out.top_logprobs))
        forks, copies = [], []
        for slot, owner in enumerate(owners):
            if owner is None or owner[0].admission != owner[1] or slot not in owner[0].slots:
                continue
            s = owner[0]
            if s.beams == 1:
                self._accept(s, int(tokens[slot]), float(logprobs[slot]), top_tokens[slot], top_logprobs[slot])
            elif slot == s.slot:  # once per beam request, over all its slots
                self._beam_step(s, top_tokens[s.slots], top_logprobs[s.slots], forks, copies)
        self._fork(forks, copies)

    def _prefill(self, batch: PrefillBatch) -> None:
        admitted_at = time.monotonic()
        params = _sampling_params(batch.requests, self.engine.eos_token_id)
        prefix = self.engine.prefill([s.tokens for s in batch.requests], params,
                                     steps=[len(s.generated) for s in batch.requests])
        if params.score_prompt.any():
            scores = jax.device_get(prefix.prompt)
            for row, s in enumerate(batch.requests):
                if params.score_prompt[row]:
                    self._collect_scores(s, scores, row, 0, len(s.tokens), final=True)
        self._state = self.engine.insert(prefix, self._state, batch.slots, self._scheduler.pages)
        self.stats["prefill_batches"] += 1
        self.stats["prefill_rows"] += len(batch.requests)
        if self.on_prefill is not None:
            self.on_prefill(batch.bucket, [admitted_at - s.submitted_at for s in batch.requests])
        self._first_tokens(prefix, batch.requests)

    def _prefill_chunk(self, chunk: PrefillChunk) -> None:
        """One chunk of a long prompt into its slot's pages; the last one samples its first token."""
        s = chunk.request
        params = _sampling_params([s], self.engine.eos_token_id)
        pages = self._scheduler.pages
        existing = PoolPrefix(self._state, pages, s.slot, chunk.start) if chunk.start else None
        prefix = self.engine.prefill([chunk.tokens], params, existing, steps=[len(s.generated)], sequences=[s.tokens])
        if params.score_prompt[0]:
            self._collect_scores(s, jax.device_get(prefix.prompt), 0, chunk.start, len(chunk.tokens), chunk.final)
        self._state = self.engine.insert(prefix, self._state, [s.slot], pages, start=chunk.start)
        self.stats["prefill_chunks"] += 1
        if chunk.final:
            if self.on_prefill is not None:
                self.on_prefill(0, [time.monotonic() - s.submitted_at])
            self._first_tokens(prefix, [s])

    def _first_tokens(self, prefix, requests: Sequence[Scheduled]) -> None:
        """Each prefilled request's first token (row r is requests[r]); a beam request starts its
        search from its one row."""
        # Whole arrays: indexing a device array compiles.
        tokens, logprobs, top_tokens, top_logprobs = jax.device_get(
            (prefix.tokens, prefix.logprobs, prefix.top_tokens, prefix.top_logprobs))
        forks, copies = [], []
        for row, s in enumerate(requests):
            if s.beams == 1:
                self._accept(s, int(tokens[row]), float(logprobs[row]), top_tokens[row], top_logprobs[row])
                continue
            r = s.request
            self._beams[r.request_id] = BeamSearch(r.num_beams, r.max_tokens, self.engine.eos_token_id, r.min_tokens,
                                                   r.length_penalty, r.early_stopping)
            self._beam_step(s, top_tokens[[row]], top_logprobs[[row]], forks, copies)
        self._fork(forks, copies)

    def _beam_step(self, s: Scheduled, top_tokens, top_logprobs, forks: list, copies: list) -> None:
        """One step of `s`'s beam search over its running beams' candidates (row i: the beam in
        s.slots[i]); adds the forks and page copies its new beams need, or ends it."""
        search = self._beams[s.request_id]
        parents = search.step(top_tokens, top_logprobs)
        self.stats["beam_steps"] += 1
        if search.done:
            self._end_beams(s, search)
            return
        with self._lock:
            copies += self._scheduler.fork_beams(s, parents)
        forks += [(slot, s.slots[p], beam.tokens[-1]) for slot, p, beam in zip(s.slots, parents, search.running)]

    def _fork(self, forks: list, copies: list) -> None:
        if forks:
            self._state = self.engine.fork(self._state, forks, copies)

    def _end_beams(self, s: Scheduled, search: BeamSearch) -> None:
        """A beam search has ended: its best beam, score and every finished beam, in one Output."""
        eos = self.engine.eos_token_id
        beams = [Beam(h.tokens, h.logprobs, self.tokenizer.decode([t for t in h.tokens if t != eos]), float(h.score))
                 for h in search.finished]
        best = beams[0]
        self.stats["tokens_out"] += len(best.token_ids)
        self._end(s)
        self._deliver(s, Output(s.request_id, best.token_ids, best.logprobs, best.text, True,
                                "stop" if best.token_ids[-1] == eos else "length", score=best.score, beams=beams))

    def _collect_scores(self, s: Scheduled, scores, row: int, start: int, length: int, final: bool) -> None:
        """Row `row` of a prefill's prompt scores (host arrays), for tokens start+1.. of `s`'s prompt
        (its prompt from `start`, `length` tokens: the whole prompt or one chunk); the prompt's last
        chunk hands them all to its stream, to go out with its first token."""
        if start == 0:  # the first chunk (again, after a preemption mid-prompt)
            self._scored[s.request_id] = ([None], [None])  # the first prompt token has no score
        logprobs, tops = self._scored[s.request_id]
        n, k = length - 1 if final else length, s.request.prompt_logprobs
        logprobs += scores.logprobs[row, :n].tolist()
        tops += [dict(zip(ids[:k].tolist(), lps[:k].tolist()))
                 for ids, lps in zip(scores.top_tokens[row, :n], scores.top_logprobs[row, :n])]
        if final:
            self._stream(s).score_prompt(*self._scored.pop(s.request_id))

    def _accept(self, s: Scheduled, token: int, logprob: float, top_tokens=None, top_logprobs=None) -> None:
        """`s`'s next token, with its row of the step's top candidates (host arrays, best first), of
        which the request's `top_logprobs` best are reported."""
        s.generated.append(token)
        k = s.request.top_logprobs
        top = dict(zip(top_tokens[:k].tolist(), top_logprobs[:k].tolist())) if k else None
        out = self._stream(s).accept(token, logprob, top)
        self.stats["tokens_out"] += len(out.token_ids)
        if out.finished:
            self._end(s)
        self._deliver(s, out)

    def _stream(self, s: Scheduled) -> OutputStream:
        return self._streams[s.request_id][0]

    def _end(self, s: Scheduled) -> None:
        """`s` has ended: the scheduler frees its slots, the engine what it held there."""
        slots = list(s.slots)
        with self._lock:
            self._scheduler.finish(s)
        self._beams.pop(s.request_id, None)
        for slot in slots:
            self.engine.free_resource(slot)

    def _deliver(self, s: Scheduled, out: Output) -> None:
        on_output = self._streams[s.request_id][1]
        if out.finished:
            del self._streams[s.request_id]
            self._scored.pop(s.request_id, None)
        on_output(out)

    def fail_all(self, error: BaseException) -> None:
        """Finish every waiting and active request with an error (the engine cannot go on)."""
        with self._lock:
            self.error = error
            ended = self._scheduler.drain()
        message = f"{type(error).__name__}: {error}"
        for s in ended:
            self._deliver(s, self._stream(s).end("error", error=message))

    # -- synchronous use ------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run `requests` to completion on this thread; results in input order."""
        outputs: dict[str, list[Output]] = {r.request_id: [] for r in requests}
        self.submit_many([(r, outputs[r.request_id].append) for r in requests])
        while self.has_work():
            self.step()
        return [Result.of(r, outputs[r.request_id]) for r in requests]

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


def _sampling_params(scheduled: Sequence[Scheduled], eos_token_id: int) -> SamplingParams:
    """Host sampling settings, a row per request, with each request's seed as the scheduler holds it.
    min_tokens holds back the request's stop tokens (EOS among them unless it ignores EOS); only a
    request's first prefill scores its prompt (a recompute after preemption has delivered them)."""
    reqs = [s.request for s in scheduled]
    return SamplingParams.host(
        [r.temperature for r in reqs], [r.top_k for r in reqs], [r.top_p for r in reqs], [s.seed for s in scheduled],
        [r.num_beams > 1 or r.top_logprobs > 0 for r in reqs],
        presence_penalty=[r.presence_penalty for r in reqs], frequency_penalty=[r.frequency_penalty for r in reqs],
        repetition_penalty=[r.repetition_penalty for r in reqs], min_tokens=[r.min_tokens for r in reqs],
        logit_bias=[dict(r.logit_bias) for r in reqs],
        suppressed=[list(r.stop_token_ids) + ([eos_token_id] if r.stop_at_eos else []) for r in reqs],
        score_prompt=[r.prompt_logprobs is not None and not s.generated for s, r in zip(scheduled, reqs)],
    )
