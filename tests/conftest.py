"""Shared test setup: 4 virtual CPU devices (set before jax is imported), Ray auth disabled, and
small random GPT-J checkpoints in the Hugging Face format, built with transformers."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from model.nn.sharding import ensure_host_devices  # noqa: E402  (must precede any jax import)

ensure_host_devices(4)

import pytest  # noqa: E402

from tests.helpers import make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A small random GPT-J in HF format (4 heads, rotary_dim < head_dim, odd vocab)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_tiny"), seed=0)


# -- Ray: one cluster and one shared Serve application per test run (see tests/cluster.py) ---------


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """A started Ray cluster with Serve's HTTP proxy; its base URL (Serve apps add their route prefix)."""
    from tests import cluster

    url = cluster.start_cluster()
    try:
        yield url
    finally:
        cluster.stop_cluster()


@pytest.fixture(scope="session")
def app_checkpoint(tmp_path_factory):
    """The random GPT-J (HF format, GPT-2's vocabulary) that the test applications serve."""
    from tests import cluster

    return make_hf_checkpoint(tmp_path_factory.mktemp("app_checkpoint"), cfg=cluster.APP_MODEL_CONFIG, seed=3)


@pytest.fixture(scope="session")
def serve_app(ray_cluster, app_checkpoint):
    """The shared GPT-J application ("gptj" at "/"); tests must leave it idle and unchanged."""
    from ray import serve

    from app.builder import build_app
    from tests import cluster

    args = cluster.shared_app_args(app_checkpoint)
    serve.run(build_app(args), name=cluster.APP_NAME, route_prefix="/")
    return cluster.ServeApp(ray_cluster, args, app_checkpoint)


@pytest.fixture(scope="module")
def client(serve_app):
    """An HTTP client for the shared application."""
    import httpx

    with httpx.Client(base_url=serve_app.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def lab(ray_cluster):
    """The lab application (tests/cluster.py), deleted at the end of the run if it is up."""
    from ray import serve

    from tests import cluster

    lab = cluster.Lab(f"{ray_cluster}/{cluster.LAB}")
    yield lab
    if cluster.LAB in serve.status().applications:
        serve.delete(cluster.LAB)


@pytest.fixture
def lab_app(lab):
    """The lab app, deployed and at full speed (a previous test may have slowed it down or deleted it)."""
    lab.ensure_deployed()
    lab.replica.slow_down.remote(0.0).result()
    return lab
