"""Serve autoscaling -> Ray autoscaler -> (fake) TPU v5e hosts, up under load and back down after it.

The simulation (tests/kuberay/autoscaling_sim.py, which says what is real and what is faked) runs in
a subprocess: it starts a Ray cluster of its own, so it must not share this process's Ray state. On
a shared machine, run it under the Ray lock:
    flock /tmp/ray-tests.lock .venv/bin/python -m pytest -q tests/kuberay/test_autoscaling_sim.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kuberay import render
from tests.kuberay import autoscaling_sim as sim


def test_load_adds_replicas_and_tpu_nodes_then_both_go_away(capsys):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "tests.kuberay.autoscaling_sim"], cwd=render.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=480)
    assert done.returncode == 0, f"simulation failed:\n{done.stderr[-4000:]}"
    report = json.loads(done.stdout)
    with capsys.disabled():
        summary = {k: v for k, v in report.items() if k != "timeline"}
        print(f"\nautoscaling simulation: {json.dumps(summary)}")

    assert report["worker_node_type"]["TPU"] == 4 and report["worker_node_type"]["TPU-v5litepod-4-head"] == 1
    assert report["deployed"] == {"t": report["deployed"]["t"], "replicas": 1, "tpu_nodes": 1}
    assert report["peak"]["replicas"] == report["peak"]["tpu_nodes"] == sim.MAX_REPLICAS
    assert report["final"] == {"replicas": 1, "tpu_nodes": 1}
    # Scaled on the replicas' held-request counts (app.autoscaling), not on Serve's count of calls.
    assert report["replica_autoscaling"]["policy"]["policy_function"] == "app.autoscaling:held_requests_policy"
    assert "held_requests" in report["policy_signals"], report["policy_signals"]
    assert report["requests_ok"] > 0 and report["request_error_count"] == 0, report["request_errors"]
    # Each replica needs a whole fake TPU host: never more replicas than hosts.
    for sample in report["timeline"]:
        assert sample["replicas_running"] <= sample["tpu_nodes"], sample
