"""int8 end to end through the Serve app: weights and KV cache quantized in the replica, greedy
HTTP output equal to the offline CLI's with the same int8 settings."""

import json
import subprocess
import sys

import httpx
from ray import serve

from app.builder import build_app
from tests.cluster import MODEL_NAME, REPO_ROOT

APP = "gptj-int8"


def test_int8_app_matches_the_int8_cli(serve_app):
    args = serve_app.args.model_copy(update={"quantize": "int8", "kv_cache_dtype": "int8"})
    serve.run(build_app(args), name=APP, route_prefix="/int8")
    try:
        prompt = "Quantized weights and an int8 cache"
        cli = subprocess.run(
            [sys.executable, "-m", "model.generate", "--checkpoint", serve_app.checkpoint.path, "--prompt", prompt,
             "--max-tokens", "12", "--quantize", "int8", "--kv-cache-dtype", "int8", "--json"],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=300, check=True,
        )
        want = json.loads(cli.stdout.strip().splitlines()[-1])
        r = httpx.post(f"{serve_app.url}/int8/v1/completions", timeout=120, json={
            "model": MODEL_NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True,
        })
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == want["token_ids"]
        assert choice["text"] == want["text"]
    finally:
        serve.delete(APP)
