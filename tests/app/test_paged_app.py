"""The KV page pool through the Serve app: `page_size` and `kv_pages` reach the replica's engine, a
pool too small for the requests in flight preempts (requeues and recomputes) rather than failing,
and the outputs, /v1/stats and the Prometheus counter show it."""

import asyncio
import time

import httpx
import pydantic
import pytest
from ray import serve

from app.args import AppArgs
from app.builder import build_app
from tests.cluster import MODEL_NAME, wait_until_idle

APP = "gptj-paged"
ROUTE = "/paged"
PAGE_SIZE = 8
KV_PAGES = 32  # the fewest that hold one 256-token sequence (the test model's n_positions) in 8-token pages
PROMPT = "The quick brown fox jumps over the lazy dog"


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


@pytest.mark.parametrize("field, value", [("page_size", 0), ("kv_pages", 0), ("hbm_utilization", 0),
                                          ("hbm_utilization", 1.5)])
def test_bad_page_settings_are_refused(field, value):
    with pytest.raises(pydantic.ValidationError, match=field):
        AppArgs(**{field: value})


def test_a_small_pool_preempts_and_outputs_stay_the_same(serve_app):
    """4 greedy requests of about 10 + 60 tokens need 9 pages each at the end, 36 in all, in a pool of
    32: the youngest are preempted and recomputed, and each output equals the shared app's (default
    pages, nothing preempted)."""
    args = serve_app.args.model_copy(update={"page_size": PAGE_SIZE, "kv_pages": KV_PAGES})
    serve.run(build_app(args), name=APP, route_prefix=ROUTE)
    try:
        url = f"{serve_app.url}{ROUTE}"
        idle = wait_until_idle(url)
        assert (idle["kv_pages_total"], idle["kv_pages_used"], idle["kv_pages_free"]) == (KV_PAGES, 0, KV_PAGES)
        assert idle["kv_cache_usage_perc"] == 0 and idle["preemptions"] == 0
        bodies = [{"model": MODEL_NAME, "prompt": f"{PROMPT} {i}", "max_tokens": 60, "temperature": 0,
                   "ignore_eos": True} for i in range(4)]
        paged = asyncio.run(post_all(url, bodies))
        reference = asyncio.run(post_all(serve_app.url, bodies))
        assert all(r.status_code == 200 for r in paged + reference), [r.text for r in paged + reference]
        assert [r.json()["choices"][0]["text"] for r in paged] == [r.json()["choices"][0]["text"] for r in reference]
        after = wait_until_idle(url)
        assert after["preemptions"] > 0, after
        assert (after["kv_pages_used"], after["kv_pages_free"], after["kv_cache_usage_perc"]) == (0, KV_PAGES, 0)
        assert_preemptions_exported(APP, after["preemptions"])
    finally:
        serve.delete(APP)


def assert_preemptions_exported(app: str, count: int) -> None:
    """The replica's `gptj_preemptions` counter reaches Prometheus with `count` (Ray exports every few seconds)."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + 60
    while True:
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        values = [float(line.rsplit(" ", 1)[1]) for line in lines
                  if line.startswith("ray_gptj_preemptions_total{") and f'application="{app}"' in line]
        if values and sum(values) == count:
            return
        assert time.monotonic() < deadline, f"ray_gptj_preemptions_total for {app}: {values}, expected {count}"
        time.sleep(2)
