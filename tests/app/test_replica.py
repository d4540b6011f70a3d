"""app.replica's pure parts, without Ray or a model: how a batch's tokens are coalesced into chunks."""

import time

from app.replica import _ChunkBuffer
from model.serving.driver import Output


def test_chunk_buffer_coalesces_tokens():
    buf = _ChunkBuffer(chunk_tokens=3, chunk_s=60)
    assert buf.wait_s() is None
    buf.add(Output("a", [1], [-0.1], "x"))
    assert buf.wait_s() == 0  # a request's first token leaves at once
    assert [c.token_ids for c in buf.take()] == [[1]]
    buf.add(Output("a", [2], [-0.2], "y"))
    buf.add(Output("b", [7], [-0.7], "z"))  # b's first token: the buffer is due, and takes a's too
    assert buf.wait_s() == 0
    assert {c.request_id: c.token_ids for c in buf.take()} == {"a": [2], "b": [7]}
    buf.add(Output("a", [3], [-0.3], "p"))
    buf.add(Output("a", [4], [-0.4], "q"))
    assert 59 < buf.wait_s() <= 60  # two tokens wait for a third, or for chunk_s
    buf.add(Output("a", [5], [-0.5], "r"))
    [chunk] = buf.take()
    assert (chunk.token_ids, chunk.text, chunk.finished) == ([3, 4, 5], "pqr", False)
    buf.add(Output("b", [8], [-0.8], "s", finished=True, finish_reason="stop"))
    assert buf.wait_s() == 0 and buf.take()[0].finish_reason == "stop"


def test_chunk_buffer_time_limit():
    buf = _ChunkBuffer(chunk_tokens=100, chunk_s=0.05)
    buf.add(Output("a", [1], [-0.1], "x"))
    buf.take()
    buf.add(Output("a", [2], [-0.1], "y"))
    assert buf.wait_s() > 0
    time.sleep(0.06)
    assert buf.wait_s() == 0
