"""What the benchmark CLIs and the tests share: a local Ray cluster serving the app (or the app
deployed into a running cluster), the app's args from a Serve config, the engine-or-served backend
flags of bench.interference and bench.prefix, the app's Serve replica processes and their memory, its
counters and whether it is idle, percentiles, progress lines and result rows.

Only the standard library is imported at module level (Ray, httpx, psutil and the app are imported
where they are used), so `bench.engine`, which runs where Ray is not installed, can use `logger`.
"""

from __future__ import annotations

import collections
import contextlib
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


def print_row(row: dict, as_json: bool) -> None:
    """One result row on stdout: a JSON object, or key=value pairs."""
    print(json.dumps(row) if as_json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


# ---------------------------------------------------------------------------------------------
# Benchmarks of the engine alone or through the served app (bench.interference, bench.prefix)


def add_backend_args(p) -> None:
    """--backend engine|http and --join URL, on an argparse parser."""
    p.add_argument("--backend", choices=["engine", "http"], default="engine",
                   help="engine: the driver in this process; http: the served app over HTTP")
    p.add_argument("--join", metavar="URL", help="with --backend http: deploy into the running Ray cluster whose "
                   "Serve proxy is at URL (default: start a local cluster)")


def check_backend_args(p, args) -> None:
    """Refuse (p.error) what --backend / --join cannot do with the other flags."""
    from model.nn.config import PRESETS

    if args.join and args.backend != "http":
        p.error("--join needs --backend http")
    if args.backend == "http" and args.max_cache_len is None and args.checkpoint not in PRESETS:
        p.error("--backend http needs --max-cache-len for a checkpoint that is not a preset (the context is "
                "known here only for presets: the weights are loaded in the app, not in this process)")


def served_context(checkpoint: str, max_cache_len: int | None) -> tuple[int, int]:
    """(the sequence context, the model's positions) of a served run, known without loading the weights:
    a preset's n_positions, or the --max-cache-len given (check_backend_args requires one otherwise)."""
    from model.nn.config import PRESETS

    n_positions = PRESETS[checkpoint].n_positions if checkpoint in PRESETS else max_cache_len
    return max_cache_len or n_positions, n_positions


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
    """The app on a Ray cluster with Serve's proxy; `deploy(args)` (re)deploys it and reports it
    through `log` (the calling CLI's), and `url` is where it answers.

    By default the cluster is this process's own: started on enter (the host's CPUs, Serve's proxy
    on a free port of 127.0.0.1), the app at "/", everything stopped on exit. With `join` (the base
    URL of a running cluster's Serve proxy) the app goes into that cluster instead, the one this
    process is connected to (a test session's: two clusters must never run at once on a shared
    machine) or else the local one `ray.init(address="auto")` finds: deployed as `name` at /`name`,
    beside whatever else runs there, and only it is deleted on exit."""

    def __init__(self, log: Callable[[str], None], join: str | None = None, name: str | None = None):
        from app.args import APP_NAME

        self.log = log
        self.join = join
        self.name = name or APP_NAME
        self.route = f"/{self.name}" if join else "/"
        self._connected = False  # whether __enter__ connected this process to a cluster it joins

    def __enter__(self) -> "LocalApp":
        import ray
        from ray import serve

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if self.join:
            if not ray.is_initialized():
                ray.init(address="auto")
                self._connected = True
            self.url = self.join.rstrip("/") + self.route
            return self
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, runtime_env={"env_vars": {"JAX_PLATFORMS": "cpu"}})
        self.url = f"http://127.0.0.1:{free_port()}"
        serve.start(http_options={"host": "127.0.0.1", "port": int(self.url.rsplit(":", 1)[1])})
        return self

    def deploy(self, args: AppArgs) -> None:
        from ray import serve

        from app.builder import build_app

        start = time.perf_counter()
        serve.run(build_app(args), name=self.name, route_prefix=self.route)
        self.log(f"app deployed (batch_max_size={args.batch_max_size}, prefill_chunk_tokens="
                 f"{args.prefill_chunk_tokens}) in {time.perf_counter() - start:.0f}s")

    def __exit__(self, *exc) -> None:
        # Ray's log monitor prints what the cluster says while it stops (the controller's shutdown
        # retries) on stdout, which holds the calling CLI's results: send it to stderr.
        with contextlib.redirect_stdout(sys.stderr):
            self._stop()

    def _stop(self) -> None:
        import ray
        from ray import serve

        if self.join:
            if self.name in serve.status().applications:
                serve.delete(self.name)
            if self._connected:
                ray.shutdown()
            return
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


def replica_totals(url: str, *names: str) -> dict[str, int]:
    """The app's /v1/stats counters `names`, each summed over its replicas."""
    import httpx

    replicas = httpx.get(f"{url}/v1/stats", timeout=30).json()["replicas"]
    return {name: sum(r[name] or 0 for r in replicas) for name in names}


def is_idle(stats: dict) -> bool:
    """Whether the app's /v1/stats body (any number of replicas) shows no work left: no slot held,
    nothing waiting in a replica, nothing held by the batcher."""
    replicas_idle = all(r["active_slots"] == 0 and r["waiting"] == 0 for r in stats["replicas"])
    return stats["batcher"]["held"] == 0 and replicas_idle
