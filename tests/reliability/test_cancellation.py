"""Cancellation: many clients that leave mid-stream at once free their slots at the next decode step.

On the lab app (tests/cluster.py, over the mock engine) each engine step is slowed to STEP_S, so a request
for MAX_TOKENS tokens would hold its slot for MAX_TOKENS * STEP_S seconds. CLIENTS streams (twice
the slots: half decode, half wait in the replica or the batcher) start together; once every slot
streams, every client disconnects at once. The replica's counters, read through /v1/stats, must
show every slot free and nothing waiting or held within a couple of decode steps of the disconnect,
every request that reached the replica recorded as cancelled, and no tokens generated for them
after that. Then it happens again, to show nothing leaks from one round to the next.

Cancellations are counted over all rounds, not per round: a batch whose call the batcher cancelled
while it was still on its way to the replica reaches the replica after the app looked idle, is
submitted and is cancelled at once, so it is counted in the next round's window (seen in CI: 10
cancellations in a round of 8 clients).
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.cluster import MODEL_NAME, is_idle, stats, wait_until_idle
from tests.reliability.helpers import Stream, figures

STEP_S = 0.05
MAX_TOKENS = 200
CLIENTS = 8
ROUNDS = 2


async def disconnect_all_at_once(url: str, slots: int) -> dict:
    """One round: CLIENTS streams, every slot streaming, then all leave; returns what was measured."""
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "return_token_ids": True}
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        streams = [Stream(client, body) for _ in range(CLIENTS)]
        deadline = time.monotonic() + 30
        while sum(s.first.is_set() for s in streams) < slots:
            assert time.monotonic() < deadline, "the slots never filled"
            await asyncio.sleep(0.01)
        at_close = await asyncio.to_thread(stats, url)
        closed_at = time.monotonic()
        for s in streams:
            s.task.cancel()  # leaving `async with client.stream(...)` closes the connection
        await asyncio.gather(*(s.task for s in streams), return_exceptions=True)
    while True:
        now = await asyncio.to_thread(stats, url)
        if is_idle(now):
            break
        assert time.monotonic() - closed_at < 10, f"slots still held 10 s after every client left: {now}"
        await asyncio.sleep(0.01)
    freed_s = time.monotonic() - closed_at
    return {"at_close": at_close, "idle": now, "freed_s": freed_s, "streaming": sum(bool(s.events) for s in streams)}


def test_disconnects_free_their_slots_at_the_next_step(lab_app):
    lab_app.replica.slow_down.remote(STEP_S).result()
    before = wait_until_idle(lab_app.url)
    slots = 4
    rounds = []
    for _ in range(ROUNDS):
        start = stats(lab_app.url)
        measured = asyncio.run(disconnect_all_at_once(lab_app.url, slots))
        at_close, idle = measured["at_close"], measured["idle"]
        steps_after_close = idle["decode_steps"] - at_close["decode_steps"]
        rounds.append({
            "clients": CLIENTS, "streaming_at_close": measured["streaming"],
            "active_slots_at_close": at_close["active_slots"], "waiting_at_close": at_close["waiting"],
            "held_at_close": at_close["batcher"]["held"], "freed_s": round(measured["freed_s"], 3),
            "decode_steps_after_close": steps_after_close,
            "cancelled": idle["cancelled"] - start["cancelled"],
            "tokens_generated": idle["tokens_out"] - start["tokens_out"],
        })
        assert at_close["active_slots"] == slots and measured["streaming"] == slots
        # The cancel travels proxy -> ingress -> batcher -> replica within a 50 ms step or two (the
        # bound leaves room for a loaded CI machine; a leak would hold the slots for 200 steps).
        assert steps_after_close <= 5, rounds[-1]
        assert measured["freed_s"] < 1.0, rounds[-1]
        assert rounds[-1]["tokens_generated"] < CLIENTS * MAX_TOKENS // 4
    after = wait_until_idle(lab_app.url)
    # Every request that reached the replica ended as cancelled (the rest never left the batcher): at
    # least the slots of each round, at most every client. The slot holders are counted just after
    # their slots are freed, so the lower bound is awaited.
    deadline = time.monotonic() + 5
    while (cancelled := after["cancelled"] - before["cancelled"]) < slots * ROUNDS and time.monotonic() < deadline:
        time.sleep(0.05)
        after = stats(lab_app.url)
    assert slots * ROUNDS <= cancelled <= CLIENTS * ROUNDS, rounds
    assert after["replica"] == before["replica"] and after["compilations_since_warmup"] == 0
    figures("cancellation", step_s=STEP_S, max_tokens=MAX_TOKENS, slots=slots, rounds=rounds, cancelled=cancelled)
