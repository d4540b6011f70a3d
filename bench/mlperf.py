"""MLPerf Inference GPT-J (summarization, CNN/DailyMail) on the real LoadGen (`mlcommons-loadgen`),
against the engine in this process or the served app over HTTP.

    # the engine (model.serving.driver.Driver over the paged engine), Offline, 64 samples, 30 s:
    python -m bench.mlperf --scenario Offline --backend engine --checkpoint small --count 64 --duration 30
    # the whole Ray Serve path (this process deploys the app on a local Ray cluster), Server at 0.5 QPS:
    flock /tmp/ray-tests.lock env RAY_AUTH_MODE=disabled python -m bench.mlperf --scenario Server \\
        --backend http --checkpoint small --count 32 --duration 60 --target-qps 0.5
    # every response against transformers' beam search on the same weights:
    python -m bench.mlperf --scenario Offline --mode accuracy --checkpoint tiny --count 24
    # an app that is already running (deployed with saxml_tokenized: true and prefix caching off):
    python -m bench.mlperf --backend http --url http://127.0.0.1:8000 --config serve_config.yaml ...

What MLPerf asks (notes/mlperf-gptj.md) and what this harness does:
- The query sample library: 13,368 samples (`--count`) in GPT-J tokens. CNN/DailyMail is not here,
  so the articles are synthetic: each sample is the MLPerf prompt template (`PROMPT_TEMPLATE`, GPT-2
  BPE, 51 tokens) around random token ids, its length drawn from the 100 measured MLPerf prompt
  lengths (`MEASURED_PROMPT_LENGTHS`) scaled by 1.17 to the whole validation split's mean (about 865
  tokens), jittered by +-5%, and the prompt cut at 1919 tokens as the reference tokenizer cuts it
  (its tail, `### Response:` included, is lost). Random weights never end a summary where a trained
  model would, so each sample also carries its own cap on new tokens, drawn from N(69, 20) clipped
  to [30, 128] (LoadGen's 69 tokens per sample, MLPerf's bounds): the stand-in for the EOS that
  ends a real summary. A beam that reaches EOS first still ends there.
- Generation: MLPerf's settings, `num_beams=4`, `early_stopping=True`, `min_new_tokens=30`, at most
  128 new tokens (the sample's cap), length penalty 1.0, greedy. The response is the best beam's
  tokens as int64 (EOS included where it ended on one), as the reference harness writes them.
- LoadGen: one test per run with GPT-J's mlperf.conf values set explicitly (`GPTJ_CONF`; LoadGen
  applies its embedded mlperf.conf only on a process's first FromConfig, so nothing here depends on
  it). `--count`, `--duration` and `--target-qps` override the sample count, the minimum duration and
  the QPS (Offline: LoadGen's expected QPS, by default what makes its one query hold `--count`
  samples; Server: the arrival rate). With the defaults (13,368 samples, 600 s) the settings are
  MLPerf's; anything else is a short run and says so (`"mlperf_settings": false`). LoadGen writes
  `mlperf_log_summary.txt`, `mlperf_log_detail.txt` and `mlperf_log_accuracy.json` into `--out`.
- Offline: LoadGen's one query is sorted by prompt length (longest first: MLPerf allows sorting
  inside a query) and handed over whole, so the engine's scheduler keeps every slot busy; over HTTP
  at most `--max-in-flight` requests are open at once (default: what the app admits). Server: each
  query is sent when LoadGen issues it; over HTTP it goes through the batcher's dynamic batching.
- No cross-query caching (MLPerf forbids it): prefix caching is off in the engine and in the app
  this harness deploys; an app given by `--url` must run without it.
- Backends: `engine` builds the replica's own driver (app.driver.load_driver, no Ray) from the app's
  args (`--config`, `--args`); `http` posts Saxml `/generate` requests, `extra_inputs.beam_size` etc.,
  to the app deployed with `saxml_tokenized: true` (token ids in and out, as Saxml's GPTJ4Tokenized
  MLPerf servables did), either by this process on a local Ray cluster or at `--url`.
- `--mode accuracy`: LoadGen issues every sample once and logs every response; then each logged
  response is compared token by token with transformers' `generate(num_beams=4, early_stopping=True,
  min_new_tokens=30, max_new_tokens=cap)` on the same weights (random weights make ROUGE meaningless,
  so token equality is the check; the EOS that ends a sequence is not compared, because a
  non-beam output leaves it out).

Output: LoadGen's logs in `--out`, progress on stderr, and one JSON line on stdout:
    {"benchmark": "mlperf-gptj", "scenario", "mode", "backend", "checkpoint", "num_beams", "count",
     "mlperf_settings", "validity" (LoadGen's VALID / INVALID), "invalid_reason", "samples", "errors",
     "samples_per_s" (LoadGen's: Offline samples/s, Server completed samples/s), "scheduled_samples_per_s"
     (Server), "tokens_per_s" (best-beam tokens generated over the run's wall time), "inferred_tokens_per_s"
     (LoadGen's samples/s x 69, MLPerf's token metric), "latency_p50_s" / "_p90_s" / "_p99_s" (LoadGen's:
     each sample from its query's issue to its response), "ttft_p50_s" / "_p90_s" /
     "_p99_s" (Server: issue to the first output the backend delivers; beam search answers whole, since the
     best beam is known only at the end, so with beams it equals the latency), "mean_prompt_tokens",
     "mean_output_tokens"; in accuracy mode "compared", "identical", "fraction_identical"; with --compare-hf N
     "reference_samples_per_s" (transformers on the first N samples, one at a time, after the test: MLPerf's
     reference SUT; torch on one thread beside JAX on a CPU) and "over_reference" (samples_per_s / that)}
The exit status is 1 when a sample failed.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Protocol

from bench.harness import app_args, logger, percentile

if TYPE_CHECKING:
    import numpy as np

    from app.args import AppArgs

log = logger("bench.mlperf")

# -- MLPerf GPT-J: the reference's prompt, generation settings and LoadGen configuration -------------

# language/gpt-j/dataset.py PROMPT_DICT["prompt_input"], with download_cnndm.py's instruction.
PROMPT_TEMPLATE = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n"
                   "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
INSTRUCTION = "Summarize the following news article:"
MAX_INPUT_TOKENS = 1919  # the reference tokenizer's max_length: 1919 + 128 new tokens fit 2048 positions
NUM_BEAMS, MIN_NEW_TOKENS, MAX_NEW_TOKENS = 4, 30, 128
QSL_SIZE = 13368  # CNN/DailyMail validation: the QSL, the accuracy set and the performance sample count
# loadgen/mlperf.conf (v4.1 to v5.0) for gptj, the values this harness sets explicitly.
GPTJ_CONF = dict(min_duration_ms=600_000, server_target_latency_ns=20 * 10**9, server_target_latency_percentile=0.99,
                 infer_token_latencies=True, token_latency_scaling_factor=69, sample_concatenate_permutation=True)
# Prompt lengths (template included, GPT-2 BPE) of the 100 MLPerf-format CNN samples in the note, sorted.
MEASURED_PROMPT_LENGTHS = (
    164, 174, 177, 218, 222, 233, 236, 237, 245, 250, 266, 274, 311, 311, 314, 334, 377, 391, 392, 398, 402, 421,
    439, 443, 444, 446, 448, 450, 459, 463, 471, 486, 492, 505, 514, 516, 537, 540, 542, 549, 553, 565, 569, 597,
    618, 627, 629, 639, 647, 667, 693, 699, 699, 699, 699, 727, 738, 740, 767, 779, 793, 823, 867, 896, 904, 910,
    962, 966, 981, 996, 997, 998, 999, 1005, 1012, 1022, 1029, 1039, 1055, 1070, 1102, 1104, 1105, 1176, 1176, 1180,
    1195, 1199, 1216, 1260, 1301, 1356, 1466, 1482, 1536, 1633, 1710, 1770, 1806, 1895,
)
TEMPLATE_TOKENS = 51  # the template's share of each measured length
ARTICLE_SCALE = 1.17  # the whole validation split's articles against these 100 (the note, section 2b)
OUTPUT_TOKENS_MEAN, OUTPUT_TOKENS_STD = 69.0, 20.0
# The app this harness deploys for the http backend, over the config's args: MLPerf's prompt lengths
# (buckets up to 1919, Saxml's 512 / 1024 / 1919 rounded to pages), no prefix caching, token ids in
# and out of /generate, and room for a 1919 + 128 context.
MLPERF_APP_ARGS = {"prompt_buckets": (512, 1024, 1920), "enable_prefix_caching": False, "saxml_tokenized": True}


@dataclasses.dataclass(frozen=True)
class Generation:
    """The generation settings of every sample (MLPerf's by default)."""

    num_beams: int = NUM_BEAMS
    min_new_tokens: int = MIN_NEW_TOKENS
    length_penalty: float = 1.0
    early_stopping: bool = True


# -- the query sample library ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int  # this sample's cap (see the module docstring): where its summary would end


def template_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The MLPerf prompt's token ids before and after the article."""
    before, after = PROMPT_TEMPLATE.format(instruction=INSTRUCTION, input="\x00").split("\x00")
    return tokenizer.encode(before), tokenizer.encode(after)


def synthetic_cnn_dailymail(count: int, tokenizer, seed: int = 0, scale: float = ARTICLE_SCALE,
                            article_vocab: int = 50256) -> list[Sample]:
    """`count` samples shaped like MLPerf's CNN/DailyMail prompts (module docstring). Sample i depends
    only on (seed, i), so a QSL of any size holds the same first samples. Article ids are drawn from
    [0, article_vocab): GPT-2's real tokens below <|endoftext|> by default."""
    import numpy as np

    before, after = template_ids(tokenizer)
    samples = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        measured = MEASURED_PROMPT_LENGTHS[rng.integers(len(MEASURED_PROMPT_LENGTHS))]
        article = max(1, round((measured - TEMPLATE_TOKENS) * scale * rng.uniform(0.95, 1.05)))
        ids = before + rng.integers(0, article_vocab, article).tolist() + after
        cap = int(np.clip(round(rng.normal(OUTPUT_TOKENS_MEAN, OUTPUT_TOKENS_STD)), MIN_NEW_TOKENS, MAX_NEW_TOKENS))
        samples.append(Sample(tuple(ids[:MAX_INPUT_TOKENS]), cap))
    return samples


# -- backends: where a sample is generated -----------------------------------------------------------

# on_done(key, token_ids or None, error or None, first_output_at): called once per sample, from any thread.
OnDone = Callable[[int, "list[int] | None", "str | None", float], None]


class Backend(Protocol):
    def submit(self, items: list[tuple[int, Sample]], on_done: OnDone) -> None:
        """Start generating every (key, sample) of `items`, in this order; returns at once."""

    def close(self) -> None: ...


class EngineBackend:
    """The replica's driver in this process, stepping on its own thread."""

    def __init__(self, driver, generation: Generation):
        self.driver = driver
        self.generation = generation
        driver.start()

    def submit(self, items: list[tuple[int, Sample]], on_done: OnDone) -> None:
        from model.serving.request import Request

        g = self.generation
        pairs = []
        for key, sample in items:
            request = Request(prompt_ids=sample.prompt_ids, max_tokens=sample.max_new_tokens, temperature=0.0,
                              stop_at_eos=True, min_tokens=g.min_new_tokens, num_beams=g.num_beams,
                              length_penalty=g.length_penalty, early_stopping=g.early_stopping)
            pairs.append((request, self._collector(key, on_done)))
        self.driver.submit_many(pairs)

    @staticmethod
    def _collector(key: int, on_done: OnDone):
        tokens: list[int] = []
        first: list[float] = []

        def on_output(out) -> None:  # on the driver thread
            if not first:
                first.append(time.perf_counter())
            tokens.extend(out.token_ids)
            if out.finished:
                error = out.error or (None if out.finish_reason in ("stop", "length") else out.finish_reason)
                on_done(key, None if error else tokens, error, first[0])

        return on_output

    def close(self) -> None:
        self.driver.stop()


class HttpBackend:
    """Saxml `/generate` requests to the served app (token ids in and out), from an asyncio loop on a
    thread of its own; a 503 (the app is at capacity) is sent again after its Retry-After."""

    def __init__(self, url: str, model_name: str, generation: Generation, max_in_flight: int):
        import httpx

        self.url, self.model_name, self.generation = url, model_name, generation
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mlperf-http", daemon=True)
        self._thread.start()
        limits = httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=max_in_flight)

        async def setup():
            self._client = httpx.AsyncClient(base_url=url, timeout=600, limits=limits)
            self._slots = asyncio.Semaphore(max_in_flight)

        asyncio.run_coroutine_threadsafe(setup(), self._loop).result()

    def submit(self, items: list[tuple[int, Sample]], on_done: OnDone) -> None:
        for key, sample in items:  # the loop starts them in this order: the semaphore is FIFO
            asyncio.run_coroutine_threadsafe(self._one(key, sample, on_done), self._loop)

    def body(self, sample: Sample) -> dict:
        g = self.generation
        return {"model": self.model_name, "query": ",".join(map(str, sample.prompt_ids)), "extra_inputs": {
            "temperature": 0.0, "per_example_max_decode_steps": sample.max_new_tokens, "beam_size": g.num_beams,
            "per_example_min_decode_steps": g.min_new_tokens, "length_penalty": g.length_penalty}}

    async def _one(self, key: int, sample: Sample, on_done: OnDone) -> None:
        import httpx

        tokens, error = None, None
        async with self._slots:
            try:
                while True:
                    r = await self._client.post("/generate", json=self.body(sample))
                    if r.status_code != 503:
                        break
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                if r.status_code == 200:
                    tokens = parse_tokenized(r.json()["generate_response"][0][0])
                else:
                    error = f"HTTP {r.status_code}: {r.text[:300]}"
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                error = f"{type(e).__name__}: {e}"
        on_done(key, tokens, error, time.perf_counter())

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._client.aclose(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def parse_tokenized(text: str) -> list[int]:
    """A tokenized /generate answer ("17,42,50256") as token ids; a clear error for a text answer."""
    try:
        return [int(t) for t in text.split(",")] if text else []
    except ValueError:
        raise ValueError(f"/generate answered text ({text[:40]!r}...), not token ids: deploy the app with "
                         "saxml_tokenized: true") from None


# -- the system under test ---------------------------------------------------------------------------


class SystemUnderTest:
    """LoadGen's SUT: hands query samples to a backend and completes them as responses arrive."""

    def __init__(self, backend: Backend, samples: list[Sample], offline: bool):
        self.backend = backend
        self.samples = samples
        self.offline = offline
        self._lock = threading.Lock()
        self._issued: dict[int, float] = {}  # LoadGen's query sample id -> when it was issued
        self.completed = 0
        self.ttfts: list[float] = []
        self.output_tokens = 0
        self.errors: list[str] = []
        self.first_issue: float | None = None
        self.last_done: float | None = None

    def issue_queries(self, query_samples) -> None:  # on LoadGen's issue thread
        import mlperf_loadgen as lg

        now = time.perf_counter()
        items = [(q.id, q.index) for q in query_samples]
        if self.offline:  # sorting inside a query is allowed; longest first leaves no long prompt for last
            items.sort(key=lambda item: -len(self.samples[item[1]].prompt_ids))
        with self._lock:
            self.first_issue = self.first_issue or now
            for query_id, _ in items:
                self._issued[query_id] = now
        try:
            self.backend.submit([(query_id, self.samples[index]) for query_id, index in items], self.complete)
        except Exception as e:  # noqa: BLE001  (LoadGen waits for every sample: answer them all)
            self.errors.append(f"{type(e).__name__}: {e}")
            lg.QuerySamplesComplete([lg.QuerySampleResponse(query_id, 0, 0) for query_id, _ in items])

    def complete(self, query_id: int, tokens: list[int] | None, error: str | None, first_at: float) -> None:
        import mlperf_loadgen as lg

        now = time.perf_counter()
        with self._lock:
            issued = self._issued.pop(query_id)
            self.completed += 1
            self.ttfts.append(first_at - issued)
            self.last_done = now
            if error is not None:
                self.errors.append(error)
            else:
                self.output_tokens += len(tokens)
        data = array.array("q", tokens or ())  # int64, as evaluation.py reads them; alive until the call returns
        address, n = data.buffer_info()
        lg.QuerySamplesComplete([lg.QuerySampleResponse(query_id, address, n * data.itemsize, n)])

    def flush_queries(self) -> None:
        pass


def loadgen_settings(scenario: str, mode: str, count: int, duration_s: float, target_qps: float | None):
    """LoadGen's settings: GPT-J's mlperf.conf values, then the run's sample count, duration and QPS."""
    import mlperf_loadgen as lg

    settings = lg.TestSettings()
    for name, value in GPTJ_CONF.items():
        setattr(settings, name, value)
    settings.scenario = lg.TestScenario.Offline if scenario == "Offline" else lg.TestScenario.Server
    settings.mode = lg.TestMode.AccuracyOnly if mode == "accuracy" else lg.TestMode.PerformanceOnly
    settings.min_duration_ms = int(duration_s * 1000)
    settings.performance_sample_count_override = count
    settings.min_query_count = count  # Offline: samples in its one query; Server: queries
    if scenario == "Offline":  # one query of max(min_query_count, 1.1 x expected QPS x duration) samples
        settings.offline_expected_qps = target_qps or (count - 0.5) / (1.1 * duration_s)
    else:
        settings.server_target_qps = target_qps or 1.0
    return settings


def run_loadgen(sut: SystemUnderTest, settings, out_dir: str) -> None:
    import mlperf_loadgen as lg

    os.makedirs(out_dir, exist_ok=True)
    output = lg.LogOutputSettings()
    output.outdir = out_dir
    output.copy_summary_to_stdout = False
    log_settings = lg.LogSettings()
    log_settings.log_output = output
    log_settings.enable_trace = False  # it reached 32 MB in five minutes of Server (the note)
    lg_sut = lg.ConstructSUT(sut.issue_queries, sut.flush_queries)
    n = len(sut.samples)
    qsl = lg.ConstructQSL(n, settings.performance_sample_count_override, lambda _: None, lambda _: None)
    try:
        lg.StartTestWithLogSettings(lg_sut, qsl, settings, log_settings, "")  # "": no audit.config
    finally:
        lg.DestroyQSL(qsl)
        lg.DestroySUT(lg_sut)


def read_detail(out_dir: str) -> dict:
    """LoadGen's `mlperf_log_detail.txt` as {key: value} (the last value of a key wins)."""
    found = {}
    with open(os.path.join(out_dir, "mlperf_log_detail.txt")) as f:
        for line in f:
            if line.startswith(":::MLLOG "):
                record = json.loads(line[len(":::MLLOG "):])
                found[record["key"]] = record["value"]
    return found


def read_accuracy_log(out_dir: str) -> dict[int, list[int]]:
    """LoadGen's `mlperf_log_accuracy.json`: each logged response as int64 token ids, by QSL index."""
    import numpy as np

    with open(os.path.join(out_dir, "mlperf_log_accuracy.json")) as f:
        entries = json.load(f)
    return {e["qsl_idx"]: np.frombuffer(bytes.fromhex(e["data"]), np.int64).tolist() for e in entries}


# -- the reference: transformers' beam search on the same weights --------------------------------------


class Reference:
    """transformers' beam search (greedy for one beam) on `checkpoint`'s float weights: the tokens each
    sample must get, computed once per sample.

    The model's output layer is cut to the real vocabulary: our log-softmax covers the 50,257 real
    tokens, and over the 50,400 padded rows it would differ, which beam search ranks by."""

    def __init__(self, checkpoint: str, generation: Generation):
        import torch

        from bench.engine import hf_model
        from model import ckpt

        loaded = ckpt.load(checkpoint, dtype="float32", progress=False)
        self.model, self._device = hf_model(loaded, "float32")
        self.eos_token_id = loaded.cfg.eos_token_id
        self.generation = generation
        real, head = loaded.cfg.real_vocab_size, self.model.lm_head
        if head.out_features > real:
            cut = torch.nn.Linear(head.in_features, real, dtype=head.weight.dtype, device=head.weight.device)
            with torch.no_grad():
                cut.weight.copy_(head.weight[:real])
                cut.bias.copy_(head.bias[:real])
            self.model.lm_head = cut
        self._done: dict[tuple[int, ...], dict] = {}

    def generate(self, prompt_ids, max_new_tokens: int) -> dict:
        """{"token_ids": the best sequence's new tokens, "score": its sequences_scores (None for one
        beam)}, computed once per (prompt, cap)."""
        key = (max_new_tokens, *prompt_ids)
        if key not in self._done:
            self._done[key] = self.run_once(prompt_ids, max_new_tokens)
        return self._done[key]

    def run_once(self, prompt_ids, max_new_tokens: int) -> dict:
        """`generate`, computed now (for timing)."""
        import torch

        g = self.generation
        ids = torch.tensor([list(prompt_ids)], device=self.model.device)
        threads = torch.get_num_threads()
        if self._device == "cpu":  # beside JAX's threads, torch's own pool starves: 36 s a sample, not 1 s
            torch.set_num_threads(1)
        try:
            with torch.inference_mode():
                out = self.model.generate(
                    ids, attention_mask=torch.ones_like(ids), num_beams=g.num_beams, early_stopping=g.early_stopping,
                    length_penalty=g.length_penalty, min_new_tokens=g.min_new_tokens, max_new_tokens=max_new_tokens,
                    do_sample=False, eos_token_id=self.eos_token_id, pad_token_id=self.eos_token_id,
                    return_dict_in_generate=True, output_scores=True,
                )
        finally:
            torch.set_num_threads(threads)
        scores = getattr(out, "sequences_scores", None)
        return {"token_ids": out.sequences[0, ids.shape[1]:].tolist(),
                "score": None if scores is None else float(scores[0])}


def check_accuracy(responses: dict[int, list[int]], samples: list[Sample], reference: Reference) -> dict:
    """Every logged response against the reference: how many are identical token for token (the EOS
    that ends a sequence aside: a non-beam output leaves it out)."""
    eos = reference.eos_token_id

    def trimmed(tokens: list[int]) -> list[int]:
        return tokens[:-1] if tokens and tokens[-1] == eos else tokens

    identical, mismatches = 0, []
    for n, (index, tokens) in enumerate(sorted(responses.items()), 1):
        sample = samples[index]
        expected = reference.generate(sample.prompt_ids, sample.max_new_tokens)["token_ids"]
        if trimmed(tokens) == trimmed(expected):
            identical += 1
        else:
            mismatches.append(index)
        if n % 8 == 0 or n == len(responses):
            log(f"accuracy: {n}/{len(responses)} compared, {identical} identical")
    compared = len(responses)
    return {"compared": compared, "identical": identical,
            "fraction_identical": round(identical / compared, 4) if compared else None,
            "mismatched_qsl_indices": mismatches[:20]}


# -- the run ------------------------------------------------------------------------------------------


def summarize(opts, sut: SystemUnderTest, detail: dict, samples: list[Sample]) -> dict:
    server = opts.scenario == "Server"
    wall = (sut.last_done - sut.first_issue) if sut.last_done and sut.first_issue else None
    latency = {f"latency_p{q}_s": _ns(detail.get(f"result_{q}.00_percentile_latency_ns")) for q in (50, 90, 99)}
    row = {
        "benchmark": "mlperf-gptj", "scenario": opts.scenario, "mode": opts.mode, "backend": opts.backend,
        "checkpoint": opts.checkpoint, "num_beams": opts.num_beams, "count": len(samples),
        "mlperf_settings": len(samples) == QSL_SIZE and opts.duration >= GPTJ_CONF["min_duration_ms"] / 1000
        and opts.num_beams == NUM_BEAMS,
        "validity": detail.get("result_validity"), "invalid_reason": detail.get("result_invalid_reason") or None,
        "samples": sut.completed, "errors": len(sut.errors),
        "samples_per_s": detail.get("result_completed_samples_per_sec" if server else "result_samples_per_second"),
        "tokens_per_s": round(sut.output_tokens / wall, 2) if wall else None,
        "inferred_tokens_per_s": detail.get("result_inferred_completed_tokens_per_second" if server
                                            else "result_inferred_tokens_per_second"),
        **latency,
    }
    if server:
        row["scheduled_samples_per_s"] = detail.get("result_scheduled_samples_per_sec")
        row.update({f"ttft_p{q}_s": _round(percentile(sut.ttfts, q)) for q in (50, 90, 99)})
    done = sut.completed - len(sut.errors)
    row["mean_prompt_tokens"] = round(sum(len(s.prompt_ids) for s in samples) / len(samples), 1)
    row["mean_output_tokens"] = round(sut.output_tokens / done, 1) if done else None
    return row


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)


def _ns(value) -> float | None:
    return None if value is None else round(value / 1e9, 4)


def mlperf_app_args(opts) -> "AppArgs":
    """The app's args for both backends: the config's, MLPERF_APP_ARGS, `--args`, then `--checkpoint`;
    prefix caching off whatever they say (MLPerf forbids caching across queries)."""
    args = app_args(opts.config, json.dumps({**MLPERF_APP_ARGS, **json.loads(opts.args or "{}")}))
    update = {"enable_prefix_caching": False}
    if opts.checkpoint:
        update["checkpoint"] = opts.checkpoint
    return args.model_validate({**args.model_dump(), **update})


def run(opts, backend: Backend, samples: list[Sample], reference: Reference | None = None) -> dict:
    """One LoadGen test of `backend` over `samples`, its accuracy check against `reference` in
    accuracy mode, and the result row."""
    sut = SystemUnderTest(backend, samples, offline=opts.scenario == "Offline")
    settings = loadgen_settings(opts.scenario, opts.mode, len(samples), opts.duration, opts.target_qps)
    log(f"LoadGen {opts.scenario} {opts.mode}: {len(samples)} samples, logs in {opts.out}")
    start = time.perf_counter()
    run_loadgen(sut, settings, opts.out)
    log(f"LoadGen done in {time.perf_counter() - start:.1f}s: {sut.completed} samples, {len(sut.errors)} errors"
        + (f" (first: {sut.errors[0]})" if sut.errors else ""))
    row = summarize(opts, sut, read_detail(opts.out), samples)
    if opts.mode == "accuracy":
        row.update(check_accuracy(read_accuracy_log(opts.out), samples, reference))
    if opts.compare_hf:
        row.update(time_reference(reference, samples[:opts.compare_hf], row["samples_per_s"]))
    return row


def time_reference(reference: Reference, samples: list[Sample], samples_per_s: float | None) -> dict:
    """MLPerf's reference SUT on the same samples in the same run: transformers, one sample at a time
    (as language/gpt-j's Offline backend runs them), timed after the LoadGen test."""
    start = time.perf_counter()
    for sample in samples:
        reference.run_once(sample.prompt_ids, sample.max_new_tokens)
    rate = len(samples) / (time.perf_counter() - start)
    log(f"reference: {len(samples)} samples at {rate:.3f} samples/s")
    return {"reference_samples_per_s": round(rate, 4),
            "over_reference": round(samples_per_s / rate, 2) if samples_per_s else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.mlperf", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenario", choices=["Offline", "Server"], default="Offline")
    p.add_argument("--mode", choices=["performance", "accuracy"], default="performance")
    p.add_argument("--backend", choices=["engine", "http"], default="engine")
    p.add_argument("--checkpoint", help="preset, checkpoint dir or URI (default: the config's)")
    p.add_argument("--count", type=int, default=QSL_SIZE, help=f"QSL samples (default {QSL_SIZE}, MLPerf's)")
    p.add_argument("--duration", type=float, default=600.0, help="LoadGen's minimum duration, s (default 600)")
    p.add_argument("--target-qps", type=float, help="Offline: expected QPS; Server: arrival rate (default 1)")
    p.add_argument("--out", default="mlperf_logs", help="directory for LoadGen's logs")
    p.add_argument("--num-beams", type=int, default=NUM_BEAMS, help=f"default {NUM_BEAMS} (MLPerf's); 1: greedy")
    p.add_argument("--config", default="serve_config.yaml", help="Serve config holding the app's args")
    p.add_argument("--args", help="JSON object of AppArgs fields overriding the config's (and MLPERF_APP_ARGS)")
    p.add_argument("--url", help="http backend: drive this running app instead of deploying one")
    p.add_argument("--max-in-flight", type=int, help="http backend: requests open at once (default: what the "
                   "app admits, max_pending_requests / num_beams)")
    p.add_argument("--seed", type=int, default=0, help="the QSL's seed")
    p.add_argument("--compare-hf", type=int, default=0, metavar="N", help="after the test, time MLPerf's reference "
                   "(transformers, one sample at a time) on the first N samples: reference_samples_per_s, over_reference")
    opts = p.parse_args(argv)
    if opts.count < 1 or opts.duration <= 0 or (opts.target_qps is not None and opts.target_qps <= 0):
        p.error("--count, --duration and --target-qps must be positive")
    if opts.url and opts.backend != "http":
        p.error("--url needs --backend http")
    return opts


def open_backend(opts, args: "AppArgs", generation: Generation, stack: contextlib.ExitStack) -> Backend:
    """The run's backend, closed (and a local app shut down) when `stack` closes."""
    if opts.backend == "engine":
        from app.driver import load_driver

        log(f"engine: loading and warming up {args.checkpoint}")
        backend = EngineBackend(load_driver(args), generation)
    else:
        from bench.harness import LocalApp

        url = opts.url
        if url is None:
            app = stack.enter_context(LocalApp(log))
            app.deploy(args)
            url = app.url
        in_flight = opts.max_in_flight or max(1, args.max_pending_requests // opts.num_beams)
        backend = HttpBackend(url, args.model_name, generation, in_flight)
    stack.callback(backend.close)
    return backend


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from model.ckpt import tokenizer_for

    args = mlperf_app_args(opts)
    opts.checkpoint = args.checkpoint
    samples = synthetic_cnn_dailymail(opts.count, tokenizer_for(args.checkpoint), opts.seed)
    generation = Generation(num_beams=opts.num_beams)
    with contextlib.ExitStack() as stack:
        backend = open_backend(opts, args, generation, stack)
        needed = opts.mode == "accuracy" or opts.compare_hf
        reference = Reference(args.checkpoint, generation) if needed else None
        row = run(opts, backend, samples, reference)
    print(json.dumps(row), flush=True)
    return 1 if row["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
