"""The bench.prefix output contract: cold and warm TTFT and the hit rate, from the driver's counters
(engine in this process) and from the served app's /v1/stats (over HTTP, in the session's Ray cluster)."""

import pytest

from bench import prefix
from tests.helpers import json_rows


def test_warm_requests_hit_the_shared_prefix(capsys):
    assert prefix.main(["--checkpoint", "tiny", "--prefix-len", "32", "--suffix-len", "16", "--requests", "4",
                        "--chunk", "32", "--max-cache-len", "64", "--json"]) == 0
    (row,) = json_rows(capsys.readouterr().out)
    assert row["backend"] == "engine"
    assert row["ttft_ms_cold"] > 0 and 0 < row["ttft_ms_warm"] <= row["ttft_ms_warm_max"]
    # queries: every prompt's 48 tokens; hits: the 2 pages of the prefix, for each of the 3 warm requests
    assert (row["prefix_cache_queries"], row["prefix_cache_hits"]) == (4 * 48, 3 * 32)
    assert row["hit_rate"] == 0.5
    assert row["compilations_after_warmup"] == 0


def test_a_single_request_is_refused(capsys):
    with pytest.raises(SystemExit):
        prefix.main(["--checkpoint", "tiny", "--requests", "1"])
    assert "--requests must be >= 2" in capsys.readouterr().err


def test_http_backend_counts_the_app_s_hits(ray_cluster, capsys):
    from ray import serve

    assert prefix.main(["--checkpoint", "tiny", "--prefix-len", "128", "--suffix-len", "8", "--requests", "8",
                        "--chunk", "32", "--max-cache-len", "160", "--backend", "http", "--join", ray_cluster,
                        "--json"]) == 0
    (row,) = json_rows(capsys.readouterr().out)
    assert row["backend"] == "http"
    assert row["ttft_ms_cold"] > 0 and 0 < row["ttft_ms_warm"] <= row["ttft_ms_warm_max"]
    # this run's own counters (the throw-away requests before it excluded): every prompt's 136 tokens;
    # hits: the 8 pages of the prefix, for each of the 7 warm requests
    assert (row["prefix_cache_queries"], row["prefix_cache_hits"]) == (8 * 136, 7 * 128)
    assert row["hit_rate"] == round(7 * 128 / (8 * 136), 4) > 0.8
    assert row["compilations_after_warmup"] == 0
    assert prefix.HTTP_APP not in serve.status().applications  # deleted at the end, the cluster left up
