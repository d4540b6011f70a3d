"""The bench.engine output contract: one JSON object per (system, batch), after warm-up."""

import json

from bench import engine as bench_engine

KEYS = {"system", "batch", "prompt_len", "new_tokens", "out_tok_s", "ms_per_step", "prefill_ms"}


def test_engine_and_hf_rows(capsys):
    assert bench_engine.main(["--checkpoint", "tiny", "--batch-sizes", "1,2", "--prompt-len", "8",
                              "--new-tokens", "4", "--compare-hf", "--repeats", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["system"], r["batch"]) for r in rows] == [("engine", 1), ("engine", 2), ("hf", 1), ("hf", 2)]
    for r in rows:
        assert KEYS <= set(r)
        assert (r["prompt_len"], r["new_tokens"]) == (8, 4)
        assert r["out_tok_s"] > 0 and r["ms_per_step"] >= 0 and r["prefill_ms"] > 0
    for r in rows[:2]:  # the engine's context defaults to prompt + new tokens
        assert (r["max_cache_len"], r["page_size"]) == (12, 16)


def test_max_cache_len_and_page_size_reach_the_rows(capsys):
    assert bench_engine.main(["--checkpoint", "tiny", "--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "3",
                              "--max-cache-len", "64", "--page-size", "4", "--repeats", "1", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["max_cache_len"], row["page_size"]) == (64, 4) and row["out_tok_s"] > 0


def test_a_context_shorter_than_the_run_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench_engine.main(["--checkpoint", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--max-cache-len", "11"])
    assert "--max-cache-len 11 is shorter than prompt-len + new-tokens (12)" in capsys.readouterr().err


def test_int8_rows_say_so(capsys):
    assert bench_engine.main(["--checkpoint", "tiny", "--batch-sizes", "2", "--prompt-len", "8", "--new-tokens", "3",
                              "--quantize", "int8", "--kv-cache-dtype", "int8", "--repeats", "1", "--json"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["quantize"] == "int8" and row["kv_cache_dtype"] == "int8" and KEYS <= set(row)


def test_bad_batch_sizes_are_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench_engine.main(["--checkpoint", "tiny", "--batch-sizes", "1,x"])
    assert "--batch-sizes must be comma-separated integers" in capsys.readouterr().err


def test_without_json_the_same_rows_as_a_table(capsys):
    engine_row = {"system": "engine", "batch": 2, "prompt_len": 8, "new_tokens": 4, "out_tok_s": 1230.83,
                  "ms_per_step": 1.63, "prefill_ms": 1.61, "dtype": "float32", "quantize": "int8", "kv_cache_dtype": "auto",
                  "max_cache_len": 12, "page_size": 16}
    hf_row = {k: engine_row[k] for k in KEYS} | {"system": "hf"}
    emit = bench_engine.Printer(as_json=False)
    emit(engine_row)
    emit(hf_row)
    header, *lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert header == list(bench_engine.COLUMNS)
    assert lines == [[str(engine_row[c]) for c in header], [str(hf_row.get(c, "-")) for c in header]]
