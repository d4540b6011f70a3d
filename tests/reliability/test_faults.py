"""Faults and shutdown on the lab app: a killed model replica, a killed batcher, a wedged engine loop,
a redeploy and a delete while generations run.

For each fault: the generations in flight end with a clear error (an error event in the stream, no
hang), Serve brings up a replacement, a request sent meanwhile is either served once it is up or
refused with a 503 (retry), and every request sent after recovery is served in full. Recovery time
is measured from the fault to the first completed request. A redeploy and a delete, on the other
hand, must not cut anything: a generation in flight when they start runs to its last token
(graceful_shutdown_timeout_s).

Each engine step is slowed (faulty.FaultInjectingReplica.slow_down) so that generations are still
running when the fault strikes. No test depends on another's having run: each asks for the lab app
(tests/cluster.py), which is redeployed in seconds (it drives the mock engine) when a
fault or the delete test left it gone.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
from ray import serve

from app import replica
from tests.cluster import LAB, LAB_ARGS, MODEL_NAME, wait_until_idle
from tests.reliability import faulty
from tests.reliability.helpers import Stream, figures, kill, replica_of, wait_until_serving

STREAM_BODY = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 200, "ignore_eos": True,
               "return_token_ids": True}
PROBE_BODY = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
AFTER_RECOVERY = 8  # requests sent at once after recovery; every one must be served in full


async def fault_during_streams(url: str, streams_wanted: int, fault, error_within_s: float) -> dict:
    """Start streams, wait until each has a token, strike (`fault()`), and check how they end."""
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        streams = [Stream(client, STREAM_BODY) for _ in range(streams_wanted)]
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams)), 60)
        assert all(s.events for s in streams), [s.error for s in streams]
        struck_at = time.monotonic()
        await asyncio.to_thread(fault)
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), error_within_s)
    errors = [s.error for s in streams]
    assert all(e and not s.done and s.tokens < STREAM_BODY["max_tokens"] for s, e in zip(streams, errors)), errors
    return {"struck_at": struck_at, "errors": errors,
            "in_flight_error_s": round(max(s.ended_at for s in streams) - struck_at, 2)}


def served_in_full(url: str, n: int) -> None:
    """Send `n` requests at once: every one must be served, with every token."""
    async def send():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=PROBE_BODY) for _ in range(n)))

    responses = asyncio.run(send())
    for r in responses:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == PROBE_BODY["max_tokens"]


def recover(url: str, struck_at: float) -> tuple[float, list]:
    """Probe until served: the seconds since the fault, and what each probe got. A probe that the
    failed deployment could not serve must get a 503 (retry), never another error."""
    probes = wait_until_serving(url, PROBE_BODY)
    assert set(probes) <= {200, 503}, probes
    return time.monotonic() - struck_at, probes


def test_killed_replica_is_replaced_and_nothing_after_recovery_is_lost(lab_app):
    lab_app.replica.slow_down.remote(0.05).result()
    victim = replica_of(LAB, "Replica")
    struck = asyncio.run(fault_during_streams(lab_app.url, 4, lambda: kill(victim), error_within_s=30))
    for error in struck["errors"]:
        assert "model replica failed" in error and "ActorDied" in error, error
    recovery_s, probes = recover(lab_app.url, struck["struck_at"])
    replacement = replica_of(LAB, "Replica")
    assert replacement.replica_id != victim.replica_id and replacement.pid != victim.pid
    served_in_full(lab_app.url, AFTER_RECOVERY)
    idle = wait_until_idle(lab_app.url)
    assert idle["replica"] == replacement.replica_id
    figures("replica killed", in_flight=4, in_flight_error_s=struck["in_flight_error_s"],
            error=struck["errors"][0][:160], recovery_s=round(recovery_s, 2), probes_during_recovery=probes,
            served_after_recovery=f"{AFTER_RECOVERY}/{AFTER_RECOVERY}")


def test_killed_batcher_is_replaced_and_the_replica_lets_go(lab_app):
    """Two of the four slots stream when the batcher dies: the other two serve the probes while Serve
    replaces the batcher, and the replica cancels the orphaned generations within a caller check or
    so, long before their max_tokens (200 steps of 0.1 s: 20 s)."""
    lab_app.replica.slow_down.remote(0.1).result()
    victim = replica_of(LAB, "Batcher")
    struck = asyncio.run(fault_during_streams(lab_app.url, 2, lambda: kill(victim), error_within_s=30))
    for error in struck["errors"]:
        assert "the batcher serving this request failed (ActorDiedError" in error, error

    freed: list[float] = []

    def watch_slots() -> None:  # asks the replica directly: /v1/stats goes through the batcher
        while lab_app.replica.stats.remote().result()["active_slots"] and time.monotonic() - struck["struck_at"] < 30:
            time.sleep(0.05)
        freed.append(time.monotonic() - struck["struck_at"])

    watcher = threading.Thread(target=watch_slots)
    watcher.start()
    recovery_s, probes = recover(lab_app.url, struck["struck_at"])
    watcher.join()
    slots_freed_s = freed[0]
    assert replica_of(LAB, "Batcher").replica_id != victim.replica_id
    assert slots_freed_s < replica.CALLER_CHECK_PERIOD_S + 6, f"orphaned slots held for {slots_freed_s:.1f} s"
    served_in_full(lab_app.url, AFTER_RECOVERY)
    wait_until_idle(lab_app.url)
    figures("batcher killed", in_flight=2, in_flight_error_s=struck["in_flight_error_s"],
            error=struck["errors"][0][:160], recovery_s=round(recovery_s, 2), probes_during_recovery=probes,
            orphaned_slots_freed_s=round(slots_freed_s, 2), served_after_recovery=f"{AFTER_RECOVERY}/{AFTER_RECOVERY}")


def test_wedged_engine_loop_fails_its_health_check_and_is_replaced(lab_app):
    """The driver's loop blocks inside a step (a hung device call). check_health sees no step for
    stall_timeout_s, fails the requests the replica holds at once, and Serve replaces the replica
    after three failed checks."""
    lab_app.replica.slow_down.remote(0.05).result()
    victim = replica_of(LAB, "Replica")
    stall = LAB_ARGS.stall_timeout_s
    within = stall + faulty.HEALTH_CHECK_PERIOD_S + 5
    struck = asyncio.run(fault_during_streams(lab_app.url, 2, lambda: lab_app.replica.wedge.remote().result(),
                                              error_within_s=within))
    for error in struck["errors"]:
        assert "no step" in error and "stall_timeout_s" in error, error
    recovery_s, probes = recover(lab_app.url, struck["struck_at"])
    replacement = replica_of(LAB, "Replica")
    assert replacement.replica_id != victim.replica_id
    served_in_full(lab_app.url, AFTER_RECOVERY)
    figures("engine loop wedged", stall_timeout_s=stall, health_check_period_s=faulty.HEALTH_CHECK_PERIOD_S,
            in_flight=2, in_flight_error_s=struck["in_flight_error_s"], error=struck["errors"][0][:160],
            recovery_s=round(recovery_s, 2), probes_during_recovery=probes,
            served_after_recovery=f"{AFTER_RECOVERY}/{AFTER_RECOVERY}")


def stream_across(lab, action) -> tuple[Stream, float]:
    """A slowed generation; `action()` runs (in a thread) once it streams; returns the finished
    stream and how long `action` took."""
    took: list[float] = []

    async def scenario() -> Stream:
        async with httpx.AsyncClient(base_url=lab.url, timeout=120) as client:
            stream = Stream(client, {**STREAM_BODY, "max_tokens": 100})
            await asyncio.wait_for(stream.first.wait(), 60)
            start = time.monotonic()
            worker = threading.Thread(target=lambda: (action(), took.append(time.monotonic() - start)))
            worker.start()
            await asyncio.wait_for(stream.task, faulty.GRACEFUL_SHUTDOWN_TIMEOUT_S + 30)
            await asyncio.to_thread(worker.join, 120)
            return stream

    stream = asyncio.run(scenario())
    assert took, "the action did not finish"
    return stream, took[0]


def test_redeploy_drains_the_generation_in_flight(lab_app):
    lab_app.replica.slow_down.remote(0.04).result()  # 100 tokens: about 4 s
    old = replica_of(LAB, "Replica")
    changed = LAB_ARGS.model_copy(update={"default_max_tokens": 17})  # every deployment's init args change
    stream, redeploy_s = stream_across(lab_app, lambda: lab_app.deploy(changed))
    assert stream.error is None and stream.done, stream.error
    assert stream.tokens == 100 and stream.finish_reason == "length"
    assert replica_of(LAB, "Replica").replica_id != old.replica_id
    served_in_full(lab_app.url, 2)
    figures("redeploy during a generation", generation_tokens=stream.tokens, completed=True,
            redeploy_s=round(redeploy_s, 2))


def test_delete_drains_the_generation_in_flight(lab_app):
    """Deletes the lab app; the next test that asks for it gets it redeployed (the `lab_app` fixture)."""
    lab_app.replica.slow_down.remote(0.04).result()
    stream, delete_s = stream_across(lab_app, lambda: serve.delete(LAB))
    assert stream.error is None and stream.done, stream.error
    assert stream.tokens == 100 and stream.finish_reason == "length"
    assert LAB not in serve.status().applications
    assert httpx.post(f"{lab_app.url}/v1/completions", json=PROBE_BODY, timeout=30).status_code == 404
    figures("delete during a generation", generation_tokens=stream.tokens, completed=True, delete_s=round(delete_s, 2))
