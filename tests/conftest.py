"""Shared test setup: 4 virtual CPU devices (set before jax is imported), Ray auth disabled, and
small random GPT-J checkpoints in the Hugging Face format, built with transformers."""

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from model.sharding import ensure_host_devices  # noqa: E402  (must precede any jax import)

ensure_host_devices(4)

import pytest  # noqa: E402

from tests.helpers import make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """A small random GPT-J in HF format (4 heads, rotary_dim < head_dim, odd vocab)."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf_tiny"), seed=0)
