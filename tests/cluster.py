"""One real Ray cluster and one shared GPT-J Serve application for the whole test run.

Every package that needs Ray (tests/app, tests/reliability) uses the session fixtures that
tests/conftest.py builds from this module: a cluster costs about 10 s to start, and two clusters
must never run at once on a shared machine (run Ray tests under `flock /tmp/ray-tests.lock`).

The cluster: 2 CPUs, no dashboard, Serve's HTTP proxy on a free port of 127.0.0.1, and a job-level
runtime_env that every Serve replica inherits: the repository on PYTHONPATH (so workers can import
test-only deployments such as tests/app/consumer.py and tests/reliability/faulty.py), CPU-only JAX,
Ray auth disabled, and TEST_API_KEY in the variable TEST_API_KEY_ENV. That variable stands for what
the GKE head pod gets from a Kubernetes Secret: present in the processes' environment, never in the
application's config (tests/reliability/test_security.py deploys an app whose `api_key_env` names it).

The shared application ("gptj" at "/") serves a random GPT-J checkpoint in the Hugging Face format
(built with transformers, GPT-2's full vocabulary so any text prompt works) through the real graph:
HTTP proxy -> Ingress -> Batcher -> Replica. Settings are small so warm-up is quick (two prompt
buckets, two batch sizes, four slots) and chosen for the tests: a batch wait long enough that
concurrent requests share a prefill, a pending limit low enough to provoke overload, a body limit
(64 KiB) low enough to provoke 413 cheaply yet above the hostile bodies that must be refused for
what they hold (a 10,000-element stop list, 30,000-deep JSON nesting). Tests that kill or redeploy
things deploy an application of their own.

The lab application ("lab" at /lab) is the graph over the mock engine (tests/mock_driver.py) with a
fault-injecting Replica (tests/reliability/faulty.py), for tests of serving behaviour rather than of
the model: tokens a person can compute (a prompt ending in token t streams t+1, t+2, ...), no weights
to load, ready in seconds, and `lab.replica.slow_down.remote(s)` / `wedge.remote()` to make
generations long enough to interrupt or to hang the engine. Tests that need it ask for the `lab_app`
fixture (tests/conftest.py), which (re)deploys it when it is not running.

Also here: what every test of a served app reads back from it (its /v1/stats counters, whether it is
idle, the payloads of a server-sent event stream).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Iterable, Iterator

import httpx

from app.args import APP_NAME, AppArgs
from bench.harness import free_port
from model.nn.config import GPTJConfig
from tests.helpers import HFCheckpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_NAME = "gptj-test"
# Tiny shapes, GPT-2's whole (padded) vocabulary, a 256-position context.
APP_MODEL_CONFIG = GPTJConfig(vocab_size=50400, n_positions=256, d_model=64, n_layers=2, n_heads=4, rotary_dim=8, d_ff=192)
TEST_API_KEY_ENV = "GPTJ_TEST_API_KEY"
TEST_API_KEY = "test-key-7f3a9c"


LAB = "lab"
LAB_ARGS = AppArgs(
    model_name=MODEL_NAME, checkpoint="tiny", max_cache_len=256, prompt_buckets=(16,), prefill_batch_buckets=(1, 4),
    slots=4, batch_max_size=4, batch_wait_ms=20, max_pending_requests=16, stall_timeout_s=2.0,
    stream_chunk_tokens=1, stream_chunk_ms=0,
)


@dataclasses.dataclass
class ServeApp:
    url: str
    args: AppArgs
    checkpoint: HFCheckpoint


@dataclasses.dataclass
class Lab:
    url: str

    @property
    def replica(self):
        """A handle to the lab's Replica deployment (fault injection, stats)."""
        from ray import serve

        return serve.get_deployment_handle("Replica", app_name=LAB)

    def deploy(self, args: AppArgs = LAB_ARGS) -> None:
        from ray import serve

        from app.builder import bind_app
        from tests.mock_driver import mock_driver
        from tests.reliability.faulty import FaultInjectingReplica

        serve.run(bind_app(args, replica=FaultInjectingReplica, driver_factory=mock_driver), name=LAB,
                  route_prefix=f"/{LAB}")

    def ensure_deployed(self) -> None:
        from ray import serve

        if LAB not in serve.status().applications:
            self.deploy()


def start_cluster() -> str:
    """Start Ray and Serve's HTTP proxy (see the module docstring); returns the proxy's base URL."""
    import ray
    from ray import serve

    env = {
        "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO_ROOT, "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"],
        TEST_API_KEY_ENV: TEST_API_KEY,
    }
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def stop_cluster() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def shared_app_args(checkpoint: HFCheckpoint) -> AppArgs:
    return AppArgs(
        model_name=MODEL_NAME, checkpoint=checkpoint.path, prompt_buckets=(16, 64), prefill_batch_buckets=(1, 4),
        slots=4, batch_max_size=4, batch_wait_ms=100, max_pending_requests=8, retry_after_s=2,
        max_request_bytes=65536, stream_chunk_tokens=4, stream_chunk_ms=50,
    )


# -- reading a served app back ----------------------------------------------------------------------


def stats(url: str, headers: dict | None = None) -> dict:
    """The batcher's counters and the (single) replica's engine counters."""
    body = httpx.get(f"{url}/v1/stats", headers=headers, timeout=30).json()
    [replica] = body["replicas"]
    return {"batcher": body["batcher"], **replica}


def is_idle(s: dict) -> bool:
    return s["active_slots"] == 0 and s["waiting"] == 0 and s["batcher"]["held"] == 0


def wait_until_idle(url: str, timeout_s: float = 30, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = stats(url, headers)
        if is_idle(s):
            return s
        assert time.monotonic() < deadline, f"the app did not go idle in {timeout_s}s: {s}"
        time.sleep(0.05)


def sse_payloads(lines: Iterable[str]) -> Iterator[dict | str]:
    """The `data:` payloads of a server-sent event stream, JSON-decoded; "[DONE]" kept as a string."""
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            yield payload if payload == "[DONE]" else json.loads(payload)
