"""Simulated autoscaling of the GKE RayService on one CPU machine: no Kubernetes, no TPU.

    flock /tmp/ray-tests.lock env RAY_AUTH_MODE=disabled .venv/bin/python -m tests.kuberay.autoscaling_sim

What is real and what is faked:
- the application is the real one, deployed from the gke-tpu overlay's serveConfigV2 (rendered by
  kuberay.render) through the controller call the dashboard makes when KubeRay submits a config:
  app.builder:build_app with tpu_chips 4, the Replica asking for {"TPU": 4}, Ingress and Batcher
  pinned to the head, proxies on the head only. Only what a CPU box cannot do is changed: the tiny
  random checkpoint, one short bucket, and Serve autoscaling delays in seconds instead of minutes;
- the worker node type is the one Ray's own KubeRay translation derives from the rendered
  RayService (`TPU: 4`, `TPU-v5litepod-4-head: 1`, min/max workers), plus the
  `accelerator_type:TPU-V5LITEPOD` resource a real v5e host reports, with 1 CPU instead of 100 (the
  raylet would start a worker process per CPU);
- the nodes are Ray's fake multi-node provider: each "TPU host" is a raylet on this machine, added
  and removed by the real Ray autoscaler (v1; the v2 fake provider needs a file the Ray 2.60 wheel
  lacks). GKE's part, a pod and a node per worker, is what the fake provider stands for.

The run: deploy (1 Replica, 1 TPU node: the group's minimum), then HTTP load on /v1/completions from
more clients than one Replica's target, until Serve runs max_replicas Replicas and the autoscaler has
added a node for each; then no load, until both are back to one. It prints a JSON report (timeline of
replica and node counts) on stdout.

Ray hygiene: every Ray process starts in the process group of the `ray start` launched here
(start_new_session), and cleanup signals that group only, never `ray stop`: other Ray clusters on
the machine are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from bench.harness import free_port
from kuberay import render

WORKER_GROUP = "tpu-v5e-2x2"
FAKE_HEAD_TYPE = "ray.head.default"  # the fake provider's fixed name for the head node type
ACCELERATOR_RESOURCE = "accelerator_type:TPU-V5LITEPOD"
MAX_REPLICAS = 3  # the GKE group allows 4; 3 keeps the run inside CI's time on 2 cores

# The gke-tpu app args, scaled to the tiny model on CPU (tpu_chips stays 4), without the API key
# (None deletes it in the merge; tests/reliability/test_security.py covers the key).
SIM_ARGS = {"checkpoint": "tiny", "dtype": "float32", "quantize": "none", "mesh": 1, "prompt_buckets": [16],
            "prefill_batch_buckets": [1, 2], "slots": 2, "max_cache_len": 64, "batch_max_size": 2,
            "batch_wait_ms": 20, "max_pending_requests": 64, "api_key_env": None}
# The GKE policy (app.autoscaling: requests held per replica, whatever their batching) with the
# target at the slot count, as on GKE; delays in seconds.
SIM_AUTOSCALING = {"min_replicas": 1, "initial_replicas": 1, "max_replicas": MAX_REPLICAS,
                   "target_ongoing_requests": 2, "upscale_delay_s": 2, "downscale_delay_s": 8,
                   "look_back_period_s": 4}
CLIENTS = 12
PROMPT = {"model": "gpt-j-6b", "prompt": "The TPU v5e is", "max_tokens": 40, "temperature": 0}


def fake_node_types() -> tuple[dict, dict]:
    """(head resources, TPU worker node type) for the fake provider, from what Ray's KubeRay
    autoscaler derives from the rendered gke-tpu RayService."""
    # Ray private APIs here and below (checked against ray 2.60, pyproject's pin): what KubeRay's
    # autoscaler derives from the RayService, the node IP, and Serve's start on a given port.
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    rayservice = next(o for o in render.render_overlay("gke-tpu").objects if o["kind"] == "RayService")
    cr = {"metadata": {"name": "gptj-raycluster-sim", "namespace": "sim"}, "spec": rayservice["spec"]["rayClusterConfig"]}
    types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    worker = types[WORKER_GROUP]
    resources = {k: v for k, v in worker["resources"].items() if k not in ("CPU", "memory")}
    resources.update({"CPU": 1, ACCELERATOR_RESOURCE: 1, "object_store_memory": 100 * 2**20})
    head = {"CPU": types["headgroup"]["resources"]["CPU"]}
    node_type = {"resources": resources, "node_config": {}, "min_workers": worker["min_workers"],
                 "max_workers": min(worker["max_workers"], MAX_REPLICAS)}
    return head, node_type


def sim_serve_config(http_port: int, jax_cache_dir: str) -> dict:
    """The gke-tpu serveConfigV2 with the CPU-box changes described in the module docstring; the
    Replicas share a JAX compilation cache, so only the first one compiles."""
    config = render.render_serve_config("gke-tpu", args=SIM_ARGS)
    return render.merge_serve_config(config, {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{"name": render.APP_NAME, "deployments": [{
            "name": "Replica",
            "autoscaling_config": SIM_AUTOSCALING,
            "ray_actor_options": {"runtime_env": {"env_vars": {
                "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": jax_cache_dir,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}}},
        }]}],
    })


def autoscaling_config(gcs_address: str, head: dict, node_type: dict) -> dict:
    """The cluster config the fake provider needs (Ray 2.60's wheel lacks the example.yaml it copies)."""
    return {
        "cluster_name": "gptj-sim", "max_workers": node_type["max_workers"],
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {FAKE_HEAD_TYPE: {"resources": head, "node_config": {}, "max_workers": 0},
                                 WORKER_GROUP: node_type},
        "head_node_type": FAKE_HEAD_TYPE, "auth": {}, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # GKE: idleTimeoutSeconds 300
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def _process_group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:  # field 5: process group
                members.append(int(entry))
    return members


def _stop_group(pgid: int, grace_s: float = 3.0) -> None:
    """SIGTERM the group, wait, SIGKILL what is left (Ray's agents ignore SIGTERM)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while _process_group_members(pgid) and time.monotonic() < end:
        time.sleep(0.25)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@contextlib.contextmanager
def fake_cluster(head: dict, node_type: dict) -> Iterator[Path]:
    """A head with the fake autoscaler, in a process group of its own; yields its temp dir."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rsim", dir="/tmp")  # Ray's socket paths must stay short
    node_ip = ray._private.services.get_node_ip_address()
    gcs_address = f"{node_ip}:{free_port()}"
    config_path = Path(tmp) / "autoscaling.json"
    config_path.write_text(json.dumps(autoscaling_config(gcs_address, head, node_type)))
    env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [str(render.REPO_ROOT), os.environ.get("PYTHONPATH")])))
    start = None
    try:
        start = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={gcs_address.rsplit(':', 1)[1]}",
             f"--num-cpus={head['CPU']}", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--object-store-memory={200 * 2**20}",
             f"--temp-dir={tmp}", "--include-dashboard=false", "--disable-usage-stats",
             f"--autoscaling-config={config_path}"],
            env=env, cwd=render.REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        _, err = start.communicate(timeout=120)
        if start.returncode != 0:
            raise RuntimeError(f"ray start failed: {err.decode()[-2000:]}")
        ray.init(address=gcs_address, log_to_driver=False)
        yield Path(tmp)
    finally:  # no serve.shutdown(): it drains every replica gracefully; the group goes as a whole
        with contextlib.suppress(Exception):
            ray.shutdown()
        if start is not None:
            _stop_group(start.pid)
        shutil.rmtree(tmp, ignore_errors=True)


class Load:
    """`CLIENTS` HTTP clients posting completions in a loop, on a thread of their own."""

    def __init__(self, url: str):
        self.url, self.ok, self.errors = url, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, http) -> None:
        while not self._stop.is_set():
            try:
                response = await http.post(self.url, json=PROMPT)
                if response.status_code == 200:
                    self.ok += 1
                else:
                    self.errors.append(f"{response.status_code} {response.text[:200]}")
            except Exception as e:  # noqa: BLE001 (a failed request is a result to report)
                self.errors.append(f"{type(e).__name__}: {e}")

    async def _run(self) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=60, trust_env=False) as http:
            await asyncio.gather(*(self._client(http) for _ in range(CLIENTS)))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)


def counts() -> dict:
    """Replica states of the Replica deployment, and the alive nodes that carry TPUs."""
    import ray
    from ray import serve

    app = serve.status().applications.get(render.APP_NAME)
    states = dict(app.deployments["Replica"].replica_states) if app and "Replica" in app.deployments else {}
    tpu_nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("TPU", 0) > 0)
    return {"app": getattr(app.status, "value", app.status) if app else None, "replicas_running": int(states.get("RUNNING", 0)),
            "replicas": int(sum(states.values())), "tpu_nodes": tpu_nodes,
            "message": app.message[-1000:] if app and app.status == "DEPLOY_FAILED" else ""}


def run() -> dict:
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    started = time.monotonic()
    timeline: list[dict] = []

    def sample(phase: str) -> dict:
        now = {"t": round(time.monotonic() - started, 1), "phase": phase, **counts()}
        if not timeline or {k: v for k, v in now.items() if k != "t"} != {k: v for k, v in timeline[-1].items() if k != "t"}:
            timeline.append(now)
        return now

    def until(phase: str, done, timeout_s: float) -> dict:
        end = time.monotonic() + timeout_s
        while True:
            now = sample(phase)
            if done(now):
                return now
            if now["message"]:
                raise RuntimeError(f"{phase}: the application failed to deploy: {now['message']}")
            if time.monotonic() > end:
                raise TimeoutError(f"{phase}: not reached in {timeout_s}s; last {now}")
            time.sleep(1)

    head, node_type = fake_node_types()
    http_port = free_port()
    with fake_cluster(head, node_type) as tmp:
        config = ServeDeploySchema.model_validate(sim_serve_config(http_port, str(tmp / "jax-cache")))
        client = serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location,
                             grpc_options=config.grpc_options.model_dump())
        client.deploy_apps(config)
        ready = until("deploy", lambda c: c["app"] == "RUNNING" and c["replicas_running"] >= 1, 120)
        deployed_at = ready["t"]
        with Load(f"http://127.0.0.1:{http_port}/v1/completions") as load:
            load_started = sample("load")["t"]
            peak = until("load", lambda c: c["replicas_running"] == MAX_REPLICAS and c["tpu_nodes"] == MAX_REPLICAS, 90)
        load_stopped = sample("idle")["t"]
        replicas_down = until("idle", lambda c: c["replicas"] == 1, 90)
        nodes_down = until("idle", lambda c: c["replicas"] == 1 and c["tpu_nodes"] == 1, 90)
        signals = policy_signals(tmp)
    [replica] = [d for d in config.applications[0].deployments if d.name == "Replica"]
    return {
        "worker_node_type": node_type["resources"], "clients": CLIENTS,
        "replica_autoscaling": replica.autoscaling_config, "policy_signals": signals,
        "deployed": {"t": deployed_at, "replicas": ready["replicas_running"], "tpu_nodes": ready["tpu_nodes"]},
        "peak": {"t": peak["t"], "after_load_s": round(peak["t"] - load_started, 1),
                 "replicas": max(s["replicas_running"] for s in timeline),
                 "tpu_nodes": max(s["tpu_nodes"] for s in timeline)},
        "back_to_one_replica_after_s": round(replicas_down["t"] - load_stopped, 1),
        "back_to_one_node_after_s": round(nodes_down["t"] - load_stopped, 1),
        "final": {"replicas": nodes_down["replicas"], "tpu_nodes": nodes_down["tpu_nodes"]},
        "requests_ok": load.ok, "request_errors": load.errors[:10], "request_error_count": len(load.errors),
        "wall_s": round(time.monotonic() - started, 1),
        "timeline": timeline,
    }


def policy_signals(ray_temp_dir: Path) -> list[str]:
    """The signals the Replica autoscaling policy switched to, in order, from the controller's log."""
    from app.autoscaling import SIGNAL_LOG

    signals = []
    for log in sorted(ray_temp_dir.glob("session_*/logs/serve/controller_*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if SIGNAL_LOG in line:
                signals.append(line.split(SIGNAL_LOG, 1)[1].split(" ", 1)[0])
    return signals


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(json.dumps(run(), indent=1))
    sys.exit(0)
