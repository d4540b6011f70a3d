"""The bench.soak report contract, from a short run against the shared test app (a few seconds)."""

import json

from bench import soak
from tests.cluster import APP_NAME, MODEL_NAME


def test_short_soak_reports_outcomes_latency_and_memory(serve_app, capsys):
    args = json.dumps({"model_name": MODEL_NAME, "prompt_buckets": list(serve_app.args.prompt_buckets)})
    code = soak.main(["--url", serve_app.url, "--app-name", APP_NAME, "--args", args, "--duration", "8",
                      "--rate", "2", "--memory-every", "2", "--seed", "1"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0, row
    assert row["errors"] == {} and row["idle_at_end"] is True
    assert row["requests"] >= 5 and sum(sum(o.values()) for o in row["outcomes"].values()) == row["requests"]
    assert set(row["outcomes"]) <= set(soak.KIND_WEIGHTS)
    for kind, outcomes in row["outcomes"].items():
        assert set(outcomes) <= {"ok", "left", "rejected"}, (kind, outcomes)
    assert row["latency_s"]["p50"] is not None and row["latency_s"]["p50"] <= row["latency_s"]["p99"]
    for when in ("start", "end", "max"):
        assert set(row["memory_mb"][when]) == {"Ingress", "Batcher", "Replica"}
        assert all(mb > 0 for mb in row["memory_mb"][when].values())
