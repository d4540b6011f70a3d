"""app.streaming, without Ray: the fan-in of a request's batcher streams (fake streams here), its
latency metrics, and its server-sent events."""

import asyncio
import json

import pytest
from ray.exceptions import RayActorError

from app.completions import CompletionAssembler, ServerPolicy, plan_completion
from app.protocol import Chunk, InvalidRequest, Overloaded, ServeError, Unavailable
from app.schemas import CompletionRequest
from app.streaming import ADMITTED, Timing, merge_streams, sse_events
from model.serving.request import Limits
from model.text.tokenizer import Tokenizer


class FakeStream:
    """A batcher call's stream: `chunks`, each after its delay (seconds), then `error` raised, or
    waiting forever with `hang`. Records whether it was cancelled."""

    def __init__(self, chunks: list[Chunk], delays: list[float] | None = None, error: Exception | None = None,
                 hang: bool = False):
        self._chunks = list(chunks)
        self._delays = list(delays or [0.0] * len(chunks))
        self._error = error
        self._hang = hang
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Chunk:
        if self._chunks:
            await asyncio.sleep(self._delays.pop(0))
            return self._chunks.pop(0)
        if self._error is not None:
            raise self._error
        if self._hang:
            await asyncio.Event().wait()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class Recorder:
    def __init__(self):
        self.values: list[tuple[float, dict]] = []

    def observe(self, value, tags=None):
        self.values.append((value, tags))

    def inc(self, value=1, tags=None):
        self.values.append((value, tags))


class FakeMetrics:
    def __init__(self):
        self.ttft, self.output_tokens, self.time_per_output_token = Recorder(), Recorder(), Recorder()


def timing() -> Timing:
    return Timing(0.0, FakeMetrics(), "test")


def tokens(request_id: str, *ids: int, finish: str | None = None) -> Chunk:
    return Chunk(request_id, list(ids), [-1.0] * len(ids), "x" * len(ids), finish_reason=finish)


async def collect(stream) -> list[Chunk]:
    return [chunk async for chunk in stream]


def admitted(request_id: str) -> Chunk:
    return Chunk(request_id, admitted=True)


async def merged_chunks(streams: list[FakeStream]) -> list[Chunk]:
    """A merged stream's chunks after its ADMITTED marker (which must come first)."""
    merged = merge_streams(streams, timing(), 1.0)
    assert await merged.__anext__() is ADMITTED
    return await collect(merged)


def test_every_first_chunk_comes_before_any_second():
    # a's chunks are all ready at once; b's first takes 50 ms: a's second must still wait for it.
    a = FakeStream([tokens("a", 1), tokens("a", 2), tokens("a", 3, finish="length")])
    b = FakeStream([tokens("b", 7), tokens("b", 8, finish="stop")], delays=[0.05, 0.0])
    c = FakeStream([tokens("c", 9, finish="stop")])  # done in its first chunk
    merged = asyncio.run(merged_chunks([a, b, c]))
    ids = [(chunk.request_id, chunk.token_ids) for chunk in merged]
    assert ids[:3] == [("a", [1]), ("b", [7]), ("c", [9])]
    assert sorted(ids[3:]) == [("a", [2]), ("a", [3]), ("b", [8])]
    assert [t for r, t in ids if r == "a"] == [[1], [2], [3]]  # each stream keeps its order
    assert not (a.cancelled or b.cancelled or c.cancelled)  # every stream finished by itself


def test_admission_comes_first_and_admitted_chunks_are_left_out():
    """The batcher's `admitted` chunks (sent before any token) make the merged stream's ADMITTED, which
    comes as soon as every choice is admitted, however long its first tokens take."""
    a = FakeStream([admitted("a"), tokens("a", 1, finish="stop")], delays=[0.0, 0.2])
    b = FakeStream([admitted("b"), tokens("b", 7), tokens("b", 8, finish="stop")], delays=[0.0, 0.2, 0.0])

    async def run():
        merged = merge_streams([a, b], timing(), 1.0)
        start = asyncio.get_running_loop().time()
        assert await merged.__anext__() is ADMITTED
        admitted_after = asyncio.get_running_loop().time() - start
        return admitted_after, await collect(merged)

    admitted_after, rest = asyncio.run(run())
    assert admitted_after < 0.1
    assert sorted((c.request_id, c.token_ids) for c in rest) == [("a", [1]), ("b", [7]), ("b", [8])]
    assert not any(c.admitted for c in rest)


def test_a_refused_first_chunk_raises_before_anything_is_yielded():
    full = Chunk("b", finish_reason="error", error="the server holds 8 requests", error_status=503, overloaded=True)
    a, b = FakeStream([tokens("a", 1)], hang=True), FakeStream([full])
    merged = merge_streams([a, b], timing(), 3.0)
    with pytest.raises(Overloaded) as e:
        asyncio.run(collect(merged))
    assert e.value.retry_after_s == 3.0 and e.value.message == "the server holds 8 requests"
    assert a.cancelled  # the other choice's call does not run on


def test_a_later_error_chunk_raises_its_serve_error_and_cancels_the_rest():
    rejected = Chunk("a", finish_reason="error", error="top_p must be in (0, 1]", error_status=400,
                     error_param="top_p")
    a = FakeStream([tokens("a", 1), rejected])
    b = FakeStream([tokens("b", 7)], hang=True)
    seen = []

    async def run():
        async for chunk in merge_streams([a, b], timing(), 1.0):
            seen.append(chunk.request_id)

    with pytest.raises(InvalidRequest) as e:
        asyncio.run(run())
    assert (e.value.param, e.value.status_code) == ("top_p", 400)
    assert seen == ["", "a", "b"] and b.cancelled and a.cancelled  # ADMITTED, then a and b; a never finished


def test_a_failed_call_raises_its_serve_error():
    a = FakeStream([tokens("a", 1)], error=RayActorError())
    with pytest.raises(Unavailable) as e:
        asyncio.run(collect(merge_streams([a], timing(), 1.0)))
    assert "the batcher serving this request failed" in e.value.message
    first_fails = FakeStream([], error=ValueError("boom"))
    with pytest.raises(ServeError, match="internal error: ValueError: boom"):
        asyncio.run(collect(merge_streams([first_fails], timing(), 1.0)))


def test_a_consumer_that_leaves_cancels_the_unfinished_streams():
    a = FakeStream([tokens("a", 1, finish="stop")])
    b = FakeStream([tokens("b", 7), tokens("b", 8)], hang=True)

    async def leave_after_two():
        merged = merge_streams([a, b], timing(), 1.0)
        assert await merged.__anext__() is ADMITTED
        chunks = [await merged.__anext__(), await merged.__anext__()]
        await merged.aclose()  # what a client disconnect does, through the consumer
        return chunks

    assert [c.request_id for c in asyncio.run(leave_after_two())] == ["a", "b"]
    assert b.cancelled and not a.cancelled


def test_timing_records_ttft_once_and_tpot_per_choice():
    metrics = FakeMetrics()
    t = Timing(0.0, metrics, "completions")
    t.on_chunk(tokens("a", 1, 2))
    t.on_chunk(tokens("b", 7))
    t.on_chunk(tokens("a", 3, finish="length"))
    t.on_chunk(tokens("b", finish="stop"))  # b: one token, no time per token
    assert len(metrics.ttft.values) == 1 and metrics.ttft.values[0][1] == {"api": "completions"}
    assert [v for v, _ in metrics.output_tokens.values] == [2, 1, 1]  # no inc(0): Ray's Counter raises on it
    [(tpot, tags)] = metrics.time_per_output_token.values
    assert tpot >= 0 and tags == {"api": "completions"}


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


def assembled(tokenizer, **fields):
    request = CompletionRequest(model="m", prompt=[1, 2], **fields)
    plan = plan_completion(request, tokenizer, Limits(50257, (16,), 64), ServerPolicy(4, 1, 8))
    return CompletionAssembler(request, plan, "m", tokenizer), plan.requests[0].request_id


def test_sse_events(tokenizer):
    assembler, rid = assembled(tokenizer)

    async def chunks():
        yield Chunk(rid, [11], [-1.0], ",")
        yield Chunk(rid, [13], [-1.0], ".", finish_reason="length")

    events = asyncio.run(collect(sse_events(assembler, chunks(), include_usage=True)))
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    payloads = [e[len("data: "):-2] for e in events]
    assert payloads[-1] == "[DONE]"
    texts = [json.loads(p)["choices"][0]["text"] for p in payloads[:2]]
    assert texts == [",", "."] and json.loads(payloads[1])["choices"][0]["finish_reason"] == "length"
    usage = json.loads(payloads[2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2
    assert len(events) == 4

    assembler, rid = assembled(tokenizer)
    no_usage = asyncio.run(collect(sse_events(assembler, chunks(), include_usage=False)))
    assert len(no_usage) == 3 and no_usage[-1] == "data: [DONE]\n\n"


def test_sse_reports_a_late_error_in_the_stream(tokenizer):
    assembler, rid = assembled(tokenizer)

    async def chunks():
        yield Chunk(rid, [11], [-1.0], ",")
        raise Unavailable("model replica failed (RayActorError: died); retry", 1.0)

    events = asyncio.run(collect(sse_events(assembler, chunks(), include_usage=True)))
    assert len(events) == 2  # no usage and no [DONE] after an error
    error = json.loads(events[1][len("data: "):])["error"]
    assert error == {"message": "model replica failed (RayActorError: died); retry", "type": "server_error",
                     "param": None, "code": 503}
