"""The memory plan for GPT-J 6B on a TPU v5e 2x2 host, from the sharded shapes: sequences that fit
with a dense cache (every sequence reserves 2048 positions) and with pages, for three length mixes."""

import json

import numpy as np

from bench import memory
from model.nn.config import preset


def plan_by_setup_and_mix(**kwargs) -> dict[tuple[str, str], dict]:
    rows = memory.plan(preset("gptj-6b"), 4, hbm_gib=16, reserve_gib=1.5, **kwargs)
    return {(r["setup"], r["mix"]): r for r in rows}


def test_weights_and_kv_bytes_on_a_2x2_host():
    rows = plan_by_setup_and_mix()
    bf16, w8, w8kv8 = rows["bf16", "full"], rows["int8 weights", "full"], rows["int8 weights + int8 KV", "full"]
    # GPT-J 6B's 6,050,882,784 parameters at 2 bytes (bf16), plus 2 more bytes for each one that stays
    # float32 (4 bytes): the layer norms' scales and biases and the biases (model/nn/transformer.py).
    layers, d_model, d_ff, vocab = 28, 4096, 16384, 50400
    float32_per_layer = 2 * d_model + d_ff + d_model  # ln scale and bias, fc_in bias, fc_out bias
    float32_outside_layers = 2 * d_model + vocab  # ln_f scale and bias, lm_head bias
    float32_params = layers * float32_per_layer + float32_outside_layers
    assert bf16["weights_bytes"] == 2 * 6_050_882_784 + (4 - 2) * float32_params
    assert 3.0e9 < bf16["weights_bytes_per_device"] < 3.1e9
    assert w8["weights_bytes_per_device"] < 0.55 * bf16["weights_bytes_per_device"]
    assert bf16["kv_bytes_per_token"] == 458_752  # 448 KiB per token in bf16
    assert w8kv8["kv_bytes_per_token"] == 2 * 28 * 16 * (256 + 4)  # int8 values + a float32 scale per head
    assert w8kv8["kv_bytes_per_page_per_device"] == 64 * 232_960 // 4  # heads split over 4 chips


def test_dense_reservation_is_the_figure_before_paging():
    rows = plan_by_setup_and_mix()
    # the published figures (docs/BENCHMARKS.md) for 2048-token sequences, the same for every mix
    for setup, before in [("bf16", 53), ("int8 weights", 59), ("int8 weights + int8 KV", 116)]:
        assert {rows[setup, mix]["before_seqs"] for mix in memory.MIXES} == {before}


def test_pages_by_hand_for_int8_weights_and_int8_kv():
    rows = plan_by_setup_and_mix()
    full, chat = rows["int8 weights + int8 KV", "full"], rows["int8 weights + int8 KV", "chat"]
    free = int(14.5 * 2**30) - full["weights_bytes_per_device"]  # 16 GiB less 1.5 GiB reserved, less the weights
    assert full["pages_per_device"] == free // (64 * 58_240) - 1 == 3741  # less the zero page
    # 2048 tokens = 32 whole pages: paging neither gains nor loses a sequence
    assert full["mean_pages_per_seq"] == 32 and full["after_seqs"] == 3741 // 32 == full["before_seqs"]
    # 300 tokens hold 5 pages of 64 (the last one partly filled)
    assert chat["mean_pages_per_seq"] == 5 and chat["after_seqs"] == 3741 // 5


def test_mlperf_mix_more_than_doubles_the_sequences_with_int8_kv():
    rows = plan_by_setup_and_mix()
    for setup in ("bf16", "int8 weights", "int8 weights + int8 KV"):
        r = rows[setup, "mlperf"]
        assert r["after_seqs"] == int(r["pages_per_device"] // r["mean_pages_per_seq"])
        assert r["after_seqs"] > 1.9 * r["before_seqs"]
    w8kv8 = rows["int8 weights + int8 KV", "mlperf"]
    assert w8kv8["after_seqs"] > 2 * 116  # the target: more than twice today's 116


def test_smaller_pages_waste_less_of_the_last_page():
    at_64 = plan_by_setup_and_mix(page_size=64, mixes=("mlperf",))
    at_16 = plan_by_setup_and_mix(page_size=16, mixes=("mlperf",))
    for key, r in at_64.items():
        # the same bytes in pages a quarter the size (each pool less its zero page)
        assert 0 <= (at_16[key]["pages_per_device"] + 1) - 4 * (r["pages_per_device"] + 1) < 4
        assert at_16[key]["after_seqs"] >= r["after_seqs"]


def test_mlperf_prompt_lengths_follow_the_notes():
    lengths = memory.mlperf_prompt_lengths()
    assert len(lengths) == 13_368 and np.array_equal(lengths, memory.mlperf_prompt_lengths())  # deterministic
    assert 845 < lengths.mean() < 885  # notes: mean about 865
    assert 740 < np.median(lengths) < 810  # notes: p50 about 775
    assert lengths.max() == 1919 and 0.02 < np.mean(lengths == 1919) < 0.06  # notes: about 4% capped
    assert lengths.min() >= 51 + int(0.95 * 1.17 * (164 - 51))
    assert np.array_equal(memory.mix_lengths("mlperf", 2048), lengths + 128)


def test_json_lines_one_per_setup_and_mix(capsys):
    assert memory.main(["--mix", "mlperf", "--mix", "chat", "--page-size", "16", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["setup"], r["mix"]) for r in rows] == [
        (s, m) for s in ("bf16", "int8 weights", "int8 weights + int8 KV") for m in ("mlperf", "chat")]
    for r in rows:
        assert r["page_size"] == 16 and r["pages_per_device"] > 0 and 0 < r["before_seqs"] < r["after_seqs"]
