"""Serving behaviour of the real graph: dynamic batching, overload, disconnects, Python handles."""

import asyncio
import time

import httpx
import pytest
from ray import serve

from app.protocol import InvalidRequest, Overloaded
from app.schemas import CompletionRequest
from model.text.tokenizer import Tokenizer
from tests import cluster
from tests.cluster import APP_NAME, MODEL_NAME, sse_payloads, stats, wait_until_idle

PROMPT = "The quick brown fox jumps over the lazy dog"


async def post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))


def test_concurrent_requests_share_prefill_batches(serve_app):
    before = wait_until_idle(serve_app.url)
    bodies = [{"model": MODEL_NAME, "prompt": f"{PROMPT} {i}", "max_tokens": 8, "temperature": 0} for i in range(4)]
    responses = asyncio.run(post_all(serve_app.url, bodies))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    after = wait_until_idle(serve_app.url)
    rows = after["prefill_rows"] - before["prefill_rows"]
    prefills = after["prefill_batches"] - before["prefill_batches"]
    assert rows == 4 and prefills < 4, f"4 concurrent requests took {prefills} prefills"
    assert after["batcher"]["batches"] - before["batcher"]["batches"] < 4
    assert after["compilations_since_warmup"] == 0


def test_kv_pages_follow_the_tokens_held(serve_app):
    """/v1/stats reports the replica's KV page pool: on CPU (no device memory to size it from) the
    dense equivalent, slots x pages per context; pages in use while a request streams; all free again
    once it has ended."""
    idle = wait_until_idle(serve_app.url)
    page_size, context = serve_app.args.page_size, cluster.APP_MODEL_CONFIG.n_positions
    total = serve_app.args.slots * context // page_size
    assert (idle["kv_pages_total"], idle["kv_pages_used"], idle["kv_pages_free"]) == (total, 0, total)
    assert idle["kv_cache_usage_perc"] == 0 and idle["preemptions"] == 0
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}

    async def stats_mid_stream() -> dict:
        async with httpx.AsyncClient(base_url=serve_app.url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                lines = r.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):  # the first token is out: the request holds pages
                        break
                during = await asyncio.to_thread(stats, serve_app.url)
                async for _ in lines:  # to the end
                    pass
        return during

    during = asyncio.run(stats_mid_stream())
    assert during["active_slots"] == 1, during  # still generating when the stats were read
    prompt_len = len(Tokenizer.gpt2().encode(PROMPT))
    assert -(-(prompt_len + 1) // page_size) <= during["kv_pages_used"] <= -(-(prompt_len + 200) // page_size)
    assert during["kv_pages_used"] + during["kv_pages_free"] == total
    assert during["kv_cache_usage_perc"] == pytest.approx(during["kv_pages_used"] / total)
    after = wait_until_idle(serve_app.url)
    assert (after["kv_pages_used"], after["kv_pages_free"], after["kv_cache_usage_perc"]) == (0, total, 0)


def test_a_shared_prompt_prefix_is_served_from_cached_pages(serve_app):
    """The server caches prompt prefixes by default: a second request that shares a 40-token prefix
    with the first is prefilled from its cached pages (two full 16-token pages), and its completion
    is what a request with nothing cached gets (a prompt that was never cached, the shared app's
    own greedy output of the same text)."""
    prefix = " ".join(["alpha beta gamma delta"] * 10)
    bodies = [{"model": MODEL_NAME, "prompt": f"{prefix} {end}", "max_tokens": 8, "temperature": 0}
              for end in ("one", "two")]
    before = wait_until_idle(serve_app.url)
    first = httpx.post(f"{serve_app.url}/v1/completions", json=bodies[0], timeout=60)
    second = httpx.post(f"{serve_app.url}/v1/completions", json=bodies[1], timeout=60)
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    after = wait_until_idle(serve_app.url)
    queries = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    hits = after["prefix_cache_hits"] - before["prefix_cache_hits"]
    tokens = [first.json()["usage"]["prompt_tokens"], second.json()["usage"]["prompt_tokens"]]
    assert queries == sum(tokens) and hits >= 32 and hits % 16 == 0, (queries, hits, tokens)
    assert after["kv_pages_cached"] >= 2 and after["kv_pages_used"] == 0
    # Served again once its pages may be cached, the second prompt must give the same completion.
    again = httpx.post(f"{serve_app.url}/v1/completions", json=bodies[1], timeout=60)
    assert again.json()["choices"][0]["text"] == second.json()["choices"][0]["text"]
    assert after["compilations_since_warmup"] == 0


def test_overload_answers_503_with_retry_after(serve_app):
    """Past max_pending_requests the batcher refuses at once (503, Retry-After; `Overloaded` through
    a Python handle); the rest are served."""
    wait_until_idle(serve_app.url)
    limit = serve_app.args.max_pending_requests
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}

    async def load_and_a_handle_call() -> tuple[list[httpx.Response], BaseException | None]:
        load = asyncio.ensure_future(post_all(serve_app.url, [body] * (limit + limit // 2)))
        deadline = time.monotonic() + 30
        while (await asyncio.to_thread(stats, serve_app.url))["batcher"]["held"] < limit:
            assert time.monotonic() < deadline and not load.done(), "the batcher never filled up"
            await asyncio.sleep(0.05)
        try:
            await serve.get_app_handle(APP_NAME).generate.remote(body)
            refused = None
        except Exception as e:  # noqa: BLE001  (checked below)
            refused = e
        return await load, refused

    responses, refused = asyncio.run(load_and_a_handle_call())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * limit + [503] * (limit // 2), statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == str(round(serve_app.args.retry_after_s))
            assert "max_pending_requests=8" in r.json()["error"]["message"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 200
    assert isinstance(refused, Overloaded), repr(refused)
    assert "max_pending_requests=8" in str(refused) and refused.retry_after_s == serve_app.args.retry_after_s
    wait_until_idle(serve_app.url)


async def _stream_first_event_then_leave(url: str, body: dict) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                for event in sse_payloads([line]):
                    return event
    raise AssertionError("no event before the stream ended")


async def _stream_to_end(url: str, body: dict) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines()]
    return [event for event in sse_payloads(lines) if event != "[DONE]"]


def test_disconnect_frees_the_slot(serve_app):
    """A client that leaves mid-stream frees its slot long before its max_tokens, while a request that
    shares its batch runs on to the end."""
    before = wait_until_idle(serve_app.url)
    long_body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 240, "ignore_eos": True, "stream": True}
    short_body = {**long_body, "max_tokens": 30}

    async def scenario():
        return await asyncio.gather(_stream_first_event_then_leave(serve_app.url, long_body),
                                    _stream_to_end(serve_app.url, short_body))

    _, kept = asyncio.run(scenario())
    assert kept[-1]["choices"][0]["finish_reason"] == "length"
    after = wait_until_idle(serve_app.url)
    assert after["cancelled"] - before["cancelled"] == 1
    generated = after["tokens_out"] - before["tokens_out"]
    assert generated < 30 + 240, generated  # the long one stopped early


def test_python_handle_from_the_driver(serve_app):
    handle = serve.get_app_handle(APP_NAME)
    request = CompletionRequest(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True)
    response = handle.generate.remote(request).result()
    http = httpx.post(f"{serve_app.url}/v1/completions", json=request.model_dump(exclude_none=True), timeout=60).json()
    assert response.choices[0].text == http["choices"][0]["text"]
    chunks = list(handle.generate_stream.options(stream=True).remote(request))
    assert "".join(c.choices[0].text for c in chunks) == response.choices[0].text
    with pytest.raises(InvalidRequest) as e:
        handle.generate.remote({"model": MODEL_NAME, "prompt": PROMPT, "n": 99}).result()
    assert e.value.param == "n"


def test_second_app_uses_the_handle(serve_app):
    from tests.app.consumer import Consumer

    consumer = serve.run(Consumer.bind(APP_NAME), name="consumer", route_prefix=None)
    try:
        request = CompletionRequest(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0, ignore_eos=True)
        text = consumer.complete.remote(request).result()
        pieces = consumer.complete_streamed.remote(request).result()
        assert len(text) > 0 and len(pieces) > 1 and "".join(pieces) == text
    finally:
        serve.delete("consumer")


def test_prometheus_metrics_are_exported(serve_app):
    """The app's own metrics reach the node's Prometheus endpoint (Ray exports every few seconds)."""
    import ray

    wanted = {"ray_gptj_time_to_first_token_seconds_count", "ray_gptj_time_per_output_token_seconds_count",
              "ray_gptj_queue_seconds_count", "ray_gptj_prefill_batch_size_count", "ray_gptj_batcher_batch_size_count",
              "ray_gptj_output_tokens_total", "ray_gptj_slot_occupancy", "ray_gptj_compilations_since_warmup",
              "ray_gptj_kv_pages_used", "ray_gptj_kv_pages_free", "ray_gptj_kv_cache_usage_perc",
              "ray_gptj_prefix_cache_queries_total"}
    httpx.post(f"{serve_app.url}/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4},
               timeout=60).raise_for_status()
    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + 60
    while True:
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        samples = {line.split("{")[0].split(" ")[0]: line for line in lines if line.startswith("ray_gptj_")}
        if wanted <= samples.keys():
            break
        assert time.monotonic() < deadline, f"missing metrics: {sorted(wanted - samples.keys())}"
        time.sleep(2)
    assert samples["ray_gptj_compilations_since_warmup"].endswith(" 0.0")
    total = stats(serve_app.url)["kv_pages_total"]
    ours = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in lines
            if line.startswith("ray_gptj_kv_") and f'application="{APP_NAME}"' in line}
    assert 0 < ours["ray_gptj_kv_pages_free"] <= total and 0 <= ours["ray_gptj_kv_pages_used"] < total
    assert 0 <= ours["ray_gptj_kv_cache_usage_perc"] < 1
