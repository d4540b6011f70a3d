"""What the reliability tests share: deploying an app of their own, waiting for it to serve, streaming,
finding and killing replica actors, and printing the figures docs/RELIABILITY.md records."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx

from app.args import AppArgs
from bench.harness import ReplicaProcess, serve_replicas
from tests.cluster import sse_payloads


def deploy(name: str, args: AppArgs, **bind) -> None:
    """Deploy the app built from `args` as application `name` at route prefix "/<name>"; `bind` goes to
    app.builder.bind_app (e.g. replica=tests.reliability.faulty.FaultInjectingReplica,
    driver_factory=tests.mock_driver.mock_driver)."""
    from ray import serve

    from app.builder import bind_app

    serve.run(bind_app(args, **bind), name=name, route_prefix=f"/{name}")


def figures(scenario: str, **values) -> None:
    """One `FIGURES {...}` line on stdout (shown with `pytest -s`): what docs/RELIABILITY.md quotes."""
    print(f"\nFIGURES {json.dumps({'scenario': scenario, **values})}", file=sys.stdout, flush=True)


# -- serving again ------------------------------------------------------------------------------


def wait_until_serving(url: str, body: dict, timeout_s: float = 120) -> list[int | str]:
    """Send `body` to /v1/completions, one after another, until one answers 200; returns what each
    got (the status, or the transport error's name)."""
    start, outcomes = time.monotonic(), []
    while True:
        try:
            outcomes.append(httpx.post(f"{url}/v1/completions", json=body, timeout=30).status_code)
        except httpx.HTTPError as e:
            outcomes.append(type(e).__name__)
        if outcomes[-1] == 200:
            return outcomes
        assert time.monotonic() - start < timeout_s, f"{url} did not serve again within {timeout_s}s: {outcomes}"
        time.sleep(0.2)


# -- streams --------------------------------------------------------------------------------------


class Stream:
    """One streamed completion read on a background task: its events, how it ended and when."""

    def __init__(self, client: httpx.AsyncClient, body: dict):
        self.events: list[dict] = []
        self.status: int | None = None
        self.done = False  # got "data: [DONE]"
        self.error: str | None = None  # an error event's message, or the transport failure
        self.ended_at: float | None = None
        self.first = asyncio.Event()  # the first event (or the end) arrived
        self.task = asyncio.create_task(self._read(client, body))

    async def _read(self, client: httpx.AsyncClient, body: dict) -> None:
        try:
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                self.status = r.status_code
                if r.status_code != 200:
                    self.error = (await r.aread()).decode()
                    return
                async for line in r.aiter_lines():
                    for payload in sse_payloads([line]):
                        if payload == "[DONE]":
                            self.done = True
                        elif "error" in payload:
                            self.error = payload["error"]["message"]
                        else:
                            self.events.append(payload)
                        self.first.set()
        except httpx.HTTPError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.ended_at = time.monotonic()
            self.first.set()

    @property
    def tokens(self) -> int:
        return sum(len(c.get("token_ids") or ()) for e in self.events for c in e["choices"])

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["finish_reason"] for e in self.events for c in e["choices"] if c["finish_reason"]]
        return reasons[-1] if reasons else None


# -- replica actors -------------------------------------------------------------------------------


def replica_of(app_name: str, deployment: str) -> ReplicaProcess:
    [replica] = [p for p in serve_replicas(app_name) if p.deployment == deployment]
    return replica


def kill(replica: ReplicaProcess) -> None:
    """Kill the replica's actor at once, as a crash would (Serve must notice and replace it)."""
    import ray

    ray.kill(ray.get_actor(replica.actor_name, namespace="serve"), no_restart=True)

