"""model/nn/config.py: presets, validation that names the field, and the Hugging Face config round trip."""

import pytest

from model.nn.config import PRESETS, ConfigError, GPTJConfig, preset


def test_presets_are_valid_and_hashable():
    assert {hash(cfg) for cfg in PRESETS.values()}  # a static argument of jit must hash
    assert PRESETS["gptj-6b"].num_params() == 6_050_882_784
    assert PRESETS["gptj-6b"].head_dim == 256 and PRESETS["gptj-6b"].real_vocab_size == 50257


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="unknown preset 'gptj-7b'"):
        preset("gptj-7b")


@pytest.mark.parametrize("fields, message", [
    ({"d_model": 64, "n_heads": 5}, "d_model=64 is not divisible by n_heads=5"),
    ({"d_model": 64, "n_heads": 4, "rotary_dim": 7}, "rotary_dim=7 must be even"),
    ({"d_model": 64, "n_heads": 4, "rotary_dim": 32}, r"rotary_dim=32 must be even and in \(0, head_dim=16\]"),
    ({"d_model": 64, "n_heads": 4, "rotary_dim": 8, "d_ff": 0}, "d_ff must be positive"),
])
def test_invalid_shapes_are_refused_by_name(fields, message):
    with pytest.raises(ConfigError, match=message):
        GPTJConfig(**fields)


def test_hf_dict_round_trip():
    cfg = GPTJConfig(vocab_size=517, n_positions=128, d_model=96, n_layers=3, n_heads=2, rotary_dim=16, d_ff=160)
    assert GPTJConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


def test_hf_defaults_follow_transformers():
    """rotary_dim absent means the whole head; n_inner absent means 4 * d_model."""
    hf = {"model_type": "gptj", "vocab_size": 100, "n_embd": 32, "n_layer": 1, "n_head": 4}
    cfg = GPTJConfig.from_hf_dict(hf)
    assert cfg.rotary_dim == 8 and cfg.d_ff == 128


@pytest.mark.parametrize("override, message", [
    ({"model_type": "gpt2"}, "model_type='gpt2'; expected 'gptj'"),
    ({"activation_function": "relu"}, "activation_function='relu' is not supported"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true"),
])
def test_hf_configs_that_are_not_gptj_are_refused(override, message):
    hf = PRESETS["tiny"].to_hf_dict() | override
    with pytest.raises(ConfigError, match=message):
        GPTJConfig.from_hf_dict(hf)
