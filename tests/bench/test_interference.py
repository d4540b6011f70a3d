"""The bench.interference output contract: unchunked and chunked rows, measured after warm-up, by the
engine in this process (alternated) and through the served app over HTTP (the session's Ray cluster)."""

import argparse

import pytest

from bench import interference
from tests.helpers import json_rows

KEYS = {"backend", "chunked", "chunk", "median_step_ms", "max_gap_ms", "long_ttft_ms", "gaps_during_prefill",
        "median_free_step_ms", "prefill_chunks", "compilations"}


def test_unchunked_then_chunked_rows(capsys):
    assert interference.main(["--checkpoint", "tiny", "--decoders", "2", "--long-prompt", "60", "--chunk", "32",
                              "--new-tokens", "16", "--max-cache-len", "64", "--repeats", "2", "--json"]) == 0
    rows = json_rows(capsys.readouterr().out)
    assert [(r["chunked"], r["chunk"], r["repeat"]) for r in rows] == [(False, None, 0), (True, 32, 0),
                                                                        (False, None, 1), (True, 32, 1)]
    for r in rows:
        assert KEYS <= set(r) and r["backend"] == "engine"
        assert r["median_step_ms"] > 0 and r["max_gap_ms"] > 0 and r["long_ttft_ms"] > 0
        assert r["gaps_during_prefill"] >= 1 and r["compilations"] == 0
    # 60 tokens in chunks of 32: two chunk steps, each with a decode step, so a decoder gets tokens meanwhile
    assert [r["prefill_chunks"] for r in rows] == [0, 2, 0, 2]  # each run's own driver counts
    assert all(r["gaps_during_prefill"] >= 2 for r in rows if r["chunked"])


def test_chunk_sizes_are_one_or_a_sweep_of_page_multiples():
    assert interference.chunk_sizes("256") == (256,)
    assert interference.chunk_sizes("64,128,256") == (64, 128, 256)
    for bad, message in (("64,100", "multiples of the page size 16"), ("64,64", "repeats a chunk size"),
                         ("64;128", "not a comma-separated list")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            interference.chunk_sizes(bad)


def test_gaps_that_overlap_the_prefill_are_the_stall():
    # decoder a: steps of 1 s, then a 5 s stall across the long prompt's prefill (submitted at 2.5, first token at 6.5)
    a = [0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 10.0]
    b = [0.5, 1.5, 2.5, 7.0, 8.0]
    row = interference.measure([a, b], submitted=2.5, first=6.5, new_tokens=7)
    assert row["max_gap_ms"] == 5000.0 and row["long_ttft_ms"] == 4000.0
    assert row["gaps_during_prefill"] == 3  # a: 2-3, 3-8; b: 2.5-7 (b's 1.5-2.5 ends at the submit)
    assert row["median_step_ms"] == 1000.0  # of all 10 gaps
    assert row["median_free_step_ms"] == 1000.0  # of the 7 that do not overlap the prefill


def test_a_decoder_that_ends_before_the_first_token_is_refused():
    with pytest.raises(interference.TooFewTokens, match="1 decoders ended before the long prompt's first token"):
        interference.measure([[0.0, 1.0, 9.0], [0.0, 1.0, 2.0]], submitted=1.5, first=5.0, new_tokens=3)


def test_a_long_prompt_that_is_not_chunked_is_refused(capsys):
    with pytest.raises(SystemExit):
        interference.main(["--checkpoint", "tiny", "--long-prompt", "32", "--chunk", "32"])
    assert "--long-prompt 32 must be longer than --chunk 32" in capsys.readouterr().err


def test_http_backend_measures_through_the_served_app(ray_cluster, capsys):
    """Both settings deployed one after the other into the session's cluster, streamed over HTTP."""
    from ray import serve

    # 400 tokens per decoder: still decoding when the long prompt has crossed the serving layers and
    # been prefilled (a decoder that ends first fails the run)
    assert interference.main(["--checkpoint", "tiny", "--decoders", "2", "--long-prompt", "60", "--chunk", "32",
                              "--new-tokens", "400", "--max-cache-len", "512", "--repeats", "1", "--backend", "http",
                              "--join", ray_cluster, "--json"]) == 0
    rows = json_rows(capsys.readouterr().out)
    assert [(r["backend"], r["chunked"], r["chunk"], r["repeat"]) for r in rows] == [("http", False, None, 0),
                                                                                   ("http", True, 32, 0)]
    for r in rows:
        assert KEYS <= set(r)
        assert r["median_step_ms"] > 0 and r["max_gap_ms"] > 0 and r["long_ttft_ms"] > 0
        assert r["gaps_during_prefill"] >= 1 and r["compilations"] == 0
        assert (r["decoders"], r["long_prompt"], r["new_tokens"], r["max_cache_len"]) == (2, 60, 400, 512)
    assert [r["prefill_chunks"] for r in rows] == [0, 2]  # from the app's /v1/stats, this run's own
    assert interference.HTTP_APP not in serve.status().applications  # deleted at the end, the cluster left up
