"""bench.roofline on CPU: the weights-only roofline, and for an engine row the live KV bytes a
length-aware step reads (what bench/gpu.sh judges the paged engine's decode against)."""

import json

from bench import roofline
from model.nn.config import preset
from model.nn.kv_cache import KVCache


def test_engine_rows_get_weights_and_live_kv_fractions(tmp_path, capsys):
    row = {"system": "engine", "batch": 4, "prompt_len": 100, "new_tokens": 20, "ms_per_step": 2.0,
           "dtype": "float32", "kv_cache_dtype": "int8", "max_cache_len": 2048}
    engine_jsonl = tmp_path / "engine.jsonl"
    engine_jsonl.write_text(json.dumps(row) + "\n" + json.dumps({"system": "hf", "batch": 4}) + "\n")
    assert roofline.main(["--checkpoint", "tiny", "--dtype", "float32", "--gib", "0.05",
                          "--engine-jsonl", str(engine_jsonl)]) == 0
    summary, annotated = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert summary["read_gb_s"] > 0 and summary["weight_bytes"] > 0
    import jax.numpy as jnp

    per_token = KVCache.bytes_per_token(preset("tiny"), jnp.float32, quantized=True)
    assert annotated["kv_bytes_per_step"] == 4 * 110 * per_token  # mean context of the decode steps: 100 + 20 / 2
    bandwidth = summary["weight_bytes"] / (summary["roofline_ms"] / 1000)
    expected = 1000 * (summary["weight_bytes"] + annotated["kv_bytes_per_step"]) / bandwidth / 2.0
    assert abs(annotated["roofline_kv_fraction"] - expected) < 2e-3
    assert annotated["roofline_kv_fraction"] > annotated["roofline_fraction"]


def test_mlperf_projection_at_a_given_bandwidth(capsys):
    """A spec-sheet bandwidth is taken as given, and the MLPerf projection is the module docstring's
    arithmetic: 2 requests x 4 beams over 865 + 69 / 2 tokens, the prefill at 2 x params x 865 FLOPs."""
    assert roofline.main(["--checkpoint", "tiny", "--dtype", "float32", "--read-gb-s", "100", "--device-name", "spec",
                          "--mlperf-requests", "2", "--tflops", "1", "--price-per-hour", "3.6"]) == 0
    summary, projection = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (summary["device"], summary["read_gb_s"]) == ("spec", 100.0)
    import jax.numpy as jnp

    cfg = preset("tiny")
    step = (summary["weight_bytes"] + 8 * 899.5 * KVCache.bytes_per_token(cfg, jnp.float32)) / 100e9
    samples_s = 1 / (69 * step / 2 + 2 * cfg.num_params() * 865 / 1e12)
    assert projection["projected"] is True and projection["beam_rows"] == 8
    assert abs(projection["samples_per_s"] - samples_s) < 0.01 * samples_s
    assert abs(projection["samples_per_dollar"] - samples_s * 1000) <= 0.01 * samples_s * 1000  # 3600 s / $3.6
