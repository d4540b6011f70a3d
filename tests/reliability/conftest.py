"""The lab application: the GPT-J graph with a fault-injecting Replica, for tests that slow down,
wedge, kill, cancel, redeploy or delete things without touching the shared application.

It is its own Serve application ("lab" at /lab) on the session's cluster, serving the `tiny` preset
(random weights, no checkpoint to build) with small buckets so it warms up in seconds. Its Replica is
tests.reliability.faulty.FaultInjectingReplica: `lab.replica.slow_down.remote(s)` makes each engine
step take `s` seconds longer, so a generation lasts long enough to be interrupted, and each decode
step is long enough to count how many pass before a cancelled slot is freed.
"""

from __future__ import annotations

import dataclasses

import pytest

from app.args import AppArgs
from tests.cluster import MODEL_NAME

LAB = "lab"
LAB_ARGS = AppArgs(
    model_name=MODEL_NAME, checkpoint="tiny", max_cache_len=256, prompt_buckets=(16,), prefill_batch_buckets=(1, 4),
    slots=4, batch_max_size=4, batch_wait_ms=20, max_pending_requests=16, stall_timeout_s=2.0,
    stream_chunk_tokens=1, stream_chunk_ms=0,
)


@dataclasses.dataclass
class Lab:
    url: str

    @property
    def replica(self):
        """A handle to the lab's Replica deployment (fault injection, stats)."""
        from ray import serve

        return serve.get_deployment_handle("Replica", app_name=LAB)

    def deploy(self, args: AppArgs = LAB_ARGS) -> None:
        from tests.reliability.faulty import FaultInjectingReplica
        from tests.reliability.helpers import deploy

        deploy(LAB, args, replica=FaultInjectingReplica)

    def ensure_deployed(self) -> None:
        from ray import serve

        if LAB not in serve.status().applications:
            self.deploy()


@pytest.fixture(scope="session")
def lab(ray_cluster) -> Lab:
    from ray import serve

    lab = Lab(f"{ray_cluster}/{LAB}")
    yield lab
    if LAB in serve.status().applications:
        serve.delete(LAB)


@pytest.fixture
def lab_app(lab) -> Lab:
    """The lab app, deployed and at full speed (a previous test may have slowed it down)."""
    lab.ensure_deployed()
    lab.replica.slow_down.remote(0.0).result()
    return lab
