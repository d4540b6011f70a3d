"""bench.mlperf: the synthetic CNN/DailyMail QSL, the LoadGen wiring (real LoadGen, an instant SUT),
and short LoadGen runs of both scenarios on the tiny preset through the engine, every logged response
checked against transformers' beam search on the same weights."""

import time

import pytest

from app.args import AppArgs
from bench import mlperf
from model.ckpt import tokenizer_for

COUNT = 16  # samples per short run (the same in every run: the reference computes each once)
SCALE = 0.25


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_for("tiny")


@pytest.fixture(scope="module")
def samples(tokenizer):
    """The short runs' QSL: articles a quarter as long as CNN/DailyMail's (prompts of about 60 to 480
    tokens), so that the reference's beam search on the CPU stays within CI's time (the full-length
    shape is test_qsl_is_shaped_like_mlperf_cnn_dailymail's)."""
    return mlperf.synthetic_cnn_dailymail(COUNT, tokenizer, scale=SCALE)


def test_qsl_is_shaped_like_mlperf_cnn_dailymail(tokenizer):
    many = mlperf.synthetic_cnn_dailymail(2000, tokenizer)
    before, after = mlperf.template_ids(tokenizer)
    assert tokenizer.decode(before).startswith("Below is an instruction") and tokenizer.decode(after).endswith(
        "### Response:")
    lengths = sorted(len(s.prompt_ids) for s in many)
    capped = sum(n == mlperf.MAX_INPUT_TOKENS for n in lengths) / len(lengths)
    # the note's resampled estimate: mean 865, median 775, 4% cut at 1919
    assert 820 < sum(lengths) / len(lengths) < 910 and 720 < lengths[len(lengths) // 2] < 830 and 0.02 < capped < 0.07
    assert lengths[-1] == mlperf.MAX_INPUT_TOKENS
    for s in many:
        assert s.prompt_ids[:len(before)] == tuple(before)
        cut = len(s.prompt_ids) == mlperf.MAX_INPUT_TOKENS
        assert cut or s.prompt_ids[-len(after):] == tuple(after)  # a cut prompt lost its tail, as the reference's
        assert 50256 not in s.prompt_ids[len(before):len(s.prompt_ids) - (0 if cut else len(after))]
    caps = [s.max_new_tokens for s in many]
    assert min(caps) == mlperf.MIN_NEW_TOKENS and max(caps) == mlperf.MAX_NEW_TOKENS
    assert 67 < sum(caps) / len(caps) < 71
    assert mlperf.synthetic_cnn_dailymail(10, tokenizer) == many[:10]  # sample i depends on (seed, i) only
    assert mlperf.synthetic_cnn_dailymail(10, tokenizer, seed=1) != many[:10]


class Echo:
    """A backend that answers every sample at once with its prompt's first three tokens."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def submit(self, items, on_done):
        self.calls.append([len(s.prompt_ids) for _, s in items])
        for key, sample in items:
            on_done(key, list(sample.prompt_ids[:3]), None, time.perf_counter())

    def close(self):
        pass


def test_loadgen_wiring_with_an_instant_sut(samples, tmp_path):
    """Offline: one query, handed over whole and sorted longest first; a short run is INVALID, and
    says why. Accuracy: LoadGen logs every sample's response as int64 token ids."""
    echo = Echo()
    opts = mlperf.parse_args(["--count", str(COUNT), "--duration", "1", "--out", str(tmp_path / "perf")])
    row = mlperf.run(opts, echo, samples)
    [lengths] = echo.calls
    assert len(lengths) == COUNT and lengths == sorted(lengths, reverse=True)
    assert (row["samples"], row["errors"], row["validity"], row["mlperf_settings"]) == (COUNT, 0, "INVALID", False)
    assert row["samples_per_s"] > 0 and row["inferred_tokens_per_s"] == pytest.approx(69 * row["samples_per_s"], 1e-3)
    detail = mlperf.read_detail(str(tmp_path / "perf"))
    assert detail["generated_samples_per_query"] == COUNT and detail["effective_sample_concatenate_permutation"]

    out = str(tmp_path / "accuracy")
    sut = mlperf.SystemUnderTest(Echo(), samples, offline=False)
    mlperf.run_loadgen(sut, mlperf.loadgen_settings("Server", "accuracy", COUNT, 1.0, 50.0), out)
    assert mlperf.read_accuracy_log(out) == {i: list(s.prompt_ids[:3]) for i, s in enumerate(samples)}


@pytest.fixture(scope="module")
def engine(samples):
    """The replica's driver on the tiny preset, shapes kept few for a quick warm-up: whole prompts in
    one bucket, 64-token pages (five decode page buckets), 16 slots (four beam searches at once)."""
    from app.driver import load_driver

    assert max(len(s.prompt_ids) for s in samples) <= 512
    args = AppArgs(checkpoint="tiny", prompt_buckets=(512,), prefill_batch_buckets=(1, 4), prefill_chunk_tokens=None,
                   enable_prefix_caching=False, max_cache_len=640, page_size=64, slots=16, batch_max_size=4)
    backend = mlperf.EngineBackend(load_driver(args), mlperf.Generation())
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def reference():
    return mlperf.Reference("tiny", mlperf.Generation())


def test_short_loadgen_runs_match_transformers(engine, reference, samples, tmp_path):
    """Offline and Server, accuracy mode: LoadGen writes its summary and its accuracy log, and every
    logged response equals transformers' beam search (4 beams, 30 to the sample's cap) token for token."""
    for scenario, qps in (("Offline", []), ("Server", ["--target-qps", "8"])):
        out = tmp_path / scenario
        opts = mlperf.parse_args(["--scenario", scenario, "--mode", "accuracy", "--count", str(COUNT), "--duration",
                                  "1", "--out", str(out), "--checkpoint", "tiny", *qps])
        row = mlperf.run(opts, engine, samples, reference)
        assert (out / "mlperf_log_summary.txt").stat().st_size > 0
        assert mlperf.read_detail(str(out))["effective_scenario"] == scenario
        logged = mlperf.read_accuracy_log(str(out))
        assert sorted(logged) == list(range(COUNT))
        for index, tokens in logged.items():
            assert mlperf.MIN_NEW_TOKENS <= len(tokens) <= samples[index].max_new_tokens
        assert (row["errors"], row["compared"], row["fraction_identical"]) == (0, COUNT, 1.0), row


def test_server_performance_row(engine, reference, samples, tmp_path):
    opts = mlperf.parse_args(["--scenario", "Server", "--count", "8", "--duration", "0.5", "--target-qps", "8",
                              "--out", str(tmp_path), "--checkpoint", "tiny", "--compare-hf", "2"])
    row = mlperf.run(opts, engine, samples[:8], reference)
    assert row["reference_samples_per_s"] > 0
    assert row["over_reference"] == pytest.approx(row["samples_per_s"] / row["reference_samples_per_s"], rel=0.01)
    assert row["validity"] == "INVALID" and row["errors"] == 0 and row["samples"] >= 8  # too few queries for p99
    assert 0 < row["latency_p50_s"] <= row["latency_p90_s"] <= row["latency_p99_s"]
    assert 0 < row["ttft_p50_s"] <= row["latency_p99_s"] and row["samples_per_s"] > 0 and row["tokens_per_s"] > 0


@pytest.mark.slow
def test_http_backend_through_the_served_app(ray_cluster, reference, samples, tmp_path):
    """The whole Ray Serve path (slow: it deploys an app of its own on the test cluster): an Offline
    accuracy run over Saxml /generate with token ids in and out, every response transformers' beams."""
    from ray import serve

    from app.builder import build_app

    args = AppArgs(model_name="mlperf", checkpoint="tiny", prompt_buckets=(512,), prefill_batch_buckets=(1, 4),
                   prefill_chunk_tokens=None, enable_prefix_caching=False, max_cache_len=640, page_size=64, slots=16,
                   batch_max_size=16, saxml_tokenized=True)
    serve.run(build_app(args), name="mlperf", route_prefix="/mlperf")
    try:
        backend = mlperf.HttpBackend(f"{ray_cluster}/mlperf", "mlperf", mlperf.Generation(), max_in_flight=4)
        opts = mlperf.parse_args(["--backend", "http", "--mode", "accuracy", "--count", str(COUNT), "--duration", "1",
                                  "--out", str(tmp_path), "--checkpoint", "tiny"])
        try:
            row = mlperf.run(opts, backend, samples, reference)
        finally:
            backend.close()
        assert (row["errors"], row["compared"], row["fraction_identical"]) == (0, COUNT, 1.0), row
    finally:
        serve.delete("mlperf")
