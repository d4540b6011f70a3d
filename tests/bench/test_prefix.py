"""The bench.prefix output contract: cold and warm TTFT and the hit rate from the driver's counters."""

import json

import pytest

from bench import prefix


def test_warm_requests_hit_the_shared_prefix(capsys):
    assert prefix.main(["--checkpoint", "tiny", "--prefix-len", "32", "--suffix-len", "16", "--requests", "4",
                        "--chunk", "32", "--max-cache-len", "64", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["ttft_ms_cold"] > 0 and 0 < row["ttft_ms_warm"] <= row["ttft_ms_warm_max"]
    # queries: every prompt's 48 tokens; hits: the 2 pages of the prefix, for each of the 3 warm requests
    assert (row["prefix_cache_queries"], row["prefix_cache_hits"]) == (4 * 48, 3 * 32)
    assert row["hit_rate"] == 0.5
    assert row["compilations_after_warmup"] == 0


def test_a_single_request_is_refused(capsys):
    with pytest.raises(SystemExit):
        prefix.main(["--checkpoint", "tiny", "--requests", "1"])
    assert "--requests must be >= 2" in capsys.readouterr().err
