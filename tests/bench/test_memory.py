"""The memory plan for GPT-J 6B on a TPU v5e 2x2 host, from the sharded shapes."""

from bench import memory
from model.nn.config import preset


def test_gptj_6b_on_a_2x2_host():
    rows = {r["setup"]: r for r in memory.plan(preset("gptj-6b"), 4, hbm_gib=16, reserve_gib=1.5)}
    bf16, w8, w8kv8 = rows["bf16"], rows["int8 weights"], rows["int8 weights + int8 KV"]
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
    assert bf16["max_seqs"] < w8["max_seqs"] < w8kv8["max_seqs"]
    assert w8kv8["max_seqs"] >= 2 * bf16["max_seqs"]
