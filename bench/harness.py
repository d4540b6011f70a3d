"""What the benchmark CLIs and the tests share: a local Ray cluster serving the app, the app's args
from a Serve config, its Serve replica processes and their memory, whether it is idle, percentiles,
and progress lines.

Only the standard library is imported at module level (Ray, httpx, psutil and the app are imported
where they are used), so `bench.engine`, which runs where Ray is not installed, can use `logger`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from app.args import AppArgs


def logger(prefix: str) -> Callable[[str], None]:
    """A progress printer for one CLI: `[prefix] message` lines on stderr (stdout holds the results)."""

    def log(msg: str) -> None:
        print(f"[{prefix}] {msg}", file=sys.stderr, flush=True)

    return log


# ---------------------------------------------------------------------------------------------
# Statistics


def percentile(values: list[float], q: float) -> float | None:
    """The `q`-th percentile (nearest rank) of `values`; None when there are none."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def percentiles(values: list[float]) -> dict[str, float | None]:
    """{"p50", "p90", "p99", "max"} of `values`, rounded to 0.1 ms (None when there are none)."""
    out = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
    out["max"] = max(values) if values else None
    return {k: None if v is None else round(v, 4) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# The app's args, and deploying it on a local Ray cluster


def app_args(config: str, overrides: str | None) -> AppArgs:
    """The gptj application's args from a Serve config file, with JSON overrides on top."""
    import yaml

    from app.args import APP_NAME, AppArgs

    with open(config) as f:
        apps = yaml.safe_load(f)["applications"]
    base = next((a.get("args", {}) for a in apps if a["name"] == APP_NAME), None)
    if base is None:
        raise SystemExit(f"{config} has no application named {APP_NAME!r}")
    return AppArgs(**{**base, **json.loads(overrides or "{}")})


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalApp:
    """A local Ray cluster with Serve's proxy on a free port; `deploy(args)` (re)deploys the app and
    reports it through `log` (the calling CLI's)."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log

    def __enter__(self) -> "LocalApp":
        import ray
        from ray import serve

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
        self.url = f"http://127.0.0.1:{free_port()}"
        serve.start(http_options={"host": "127.0.0.1", "port": int(self.url.rsplit(":", 1)[1])})
        return self

    def deploy(self, args: AppArgs) -> None:
        from ray import serve

        from app.args import APP_NAME
        from app.builder import build_app

        start = time.perf_counter()
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        self.log(f"app deployed (batch_max_size={args.batch_max_size}) in {time.perf_counter() - start:.0f}s")

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Serve replica processes and their memory


@dataclasses.dataclass(frozen=True)
class ReplicaProcess:
    """One live Serve replica actor of an application."""

    deployment: str
    replica_id: str  # Serve's unique id of the replica (what the Replica's stats() reports)
    actor_name: str  # its named actor, in Ray's "serve" namespace (ray.get_actor(name, namespace="serve"))
    pid: int


def serve_replicas(app_name: str) -> list[ReplicaProcess]:
    """The live replica actors of `app_name`, from the GCS actor table: works without Ray's
    dashboard, in any process connected to the cluster (`ray.init(address=...)`)."""
    # Private Ray API (checked against ray 2.60, the version pyproject pins), as is the actor name
    # format SERVE_REPLICA::<app>#<deployment>#<replica id>: after a Ray upgrade, look here first.
    from ray._private import state

    prefix = f"SERVE_REPLICA::{app_name}#"
    found = []
    for info in state.actors(actor_state_name="ALIVE").values():
        name = info["Name"]
        if name.startswith(prefix):
            deployment, replica_id = name[len(prefix):].split("#", 1)
            found.append(ReplicaProcess(deployment, replica_id, name, info["Pid"]))
    return sorted(found, key=lambda p: (p.deployment, p.replica_id))


def replica_memory_mb(app_name: str) -> dict[str, float]:
    """Resident set size of the app's replica processes on this host, summed per deployment (MB)."""
    import psutil

    memory: dict[str, float] = collections.defaultdict(float)
    for p in serve_replicas(app_name):
        try:
            memory[p.deployment] += psutil.Process(p.pid).memory_info().rss / 2**20
        except psutil.Error:  # another host's pid, or it just exited
            continue
    return {k: round(v, 1) for k, v in sorted(memory.items())}


# ---------------------------------------------------------------------------------------------
# The app's counters


def is_idle(stats: dict) -> bool:
    """Whether the app's /v1/stats body (any number of replicas) shows no work left: no slot held,
    nothing waiting in a replica, nothing held by the batcher."""
    replicas_idle = all(r["active_slots"] == 0 and r["waiting"] == 0 for r in stats["replicas"])
    return stats["batcher"]["held"] == 0 and replicas_idle
