"""preStop hook of the model hosts: drain this Ray node before Kubernetes stops the pod.

    python -m kuberay.drain --deadline-s 270

Kubernetes sends SIGTERM to a pod it removes (node upgrade or maintenance, eviction, `kubectl
delete`), and Ray's processes then stop at once: a Replica's in-flight generations would be cut.
This hook runs first, inside terminationGracePeriodSeconds:

1. if no Serve replica lives on this node (the usual case: the Ray autoscaler only gives back idle
   hosts), it returns at once;
2. otherwise it marks the node as draining with a deadline (`ray drain-node`, the same GCS call the
   autoscaler makes before removing a node). Ray then schedules nothing new there, and Serve starts
   replacement replicas elsewhere (if a TPU host is free or can be added) and stops this node's
   replicas gracefully, each after its generations finish (graceful_shutdown_timeout_s);
3. it waits until no Serve replica is alive on this node, or the deadline passes.

Any failure ends the hook with exit status 0: it must never be why a pod cannot stop (the kubelet
kills it at the end of the grace period in any case).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Callable

SERVE_REPLICA_CLASS_PREFIX = "ServeReplica:"


def wait_until_drained(count_replicas: Callable[[], int], deadline_s: float, poll_s: float = 2.0,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> bool:
    """Poll `count_replicas` until it returns 0 (True) or `deadline_s` passes (False)."""
    end = clock() + deadline_s
    while count_replicas() > 0:
        if clock() >= end:
            return False
        sleep(poll_s)
    return True


def drain_command(node_id: str, deadline_s: int) -> list[str]:
    return ["ray", "drain-node", "--node-id", node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
            "--reason-message", "Kubernetes is terminating the pod", "--deadline-remaining-seconds", str(deadline_s)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kuberay.drain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--deadline-s", type=int, required=True,
                        help="seconds Serve gets to move replicas off this node (below terminationGracePeriodSeconds)")
    args = parser.parse_args(argv)
    try:
        import ray
        from ray.util.state import list_actors

        ray.init(address="auto", log_to_driver=False)
        node_id = ray.get_runtime_context().get_node_id()

        def count_replicas() -> int:
            actors = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], limit=10_000)
            return sum(a.class_name.startswith(SERVE_REPLICA_CLASS_PREFIX) for a in actors)

        if count_replicas() == 0:
            return 0
        subprocess.run(drain_command(node_id, args.deadline_s), check=True, timeout=60)
        drained = wait_until_drained(count_replicas, args.deadline_s)
        print(f"kuberay.drain: node {node_id} {'drained' if drained else 'still has replicas at the deadline'}",
              file=sys.stderr)
    except Exception as e:  # noqa: BLE001 (see the module docstring: never block the pod's termination)
        print(f"kuberay.drain: not drained ({type(e).__name__}: {e})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
