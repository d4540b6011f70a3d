"""GPT-J model configuration: one frozen, hashable dataclass with named presets.

The config is hashable so it can be a static argument of `jax.jit`. Presets:

- `gptj-6b`: the real EleutherAI GPT-J 6B shapes (28 layers, d_model 4096, 16 heads x 256).
- `small`: 8 layers, d_model 512, the CPU benchmark model.
- `tiny`: 2 layers, d_model 64, the local default and the test model.

A preset used as a checkpoint means "random weights of these shapes, from a fixed seed".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# GPT-2 byte-level BPE: token ids below this are real; rows above it in the (padded) vocabulary
# exist only for matmul-friendly shapes and are never sampled.
GPT2_VOCAB_SIZE = 50257
ENDOFTEXT_ID = 50256


class ConfigError(ValueError):
    """A checkpoint's config is not a GPT-J config this code can run."""


@dataclasses.dataclass(frozen=True)
class GPTJConfig:
    vocab_size: int = 50400  # rows of wte / lm_head (padded); see `real_vocab_size`
    n_positions: int = 2048
    d_model: int = 4096
    n_layers: int = 28
    n_heads: int = 16
    rotary_dim: int = 64  # rotary embedding covers only the first `rotary_dim` dims of each head
    d_ff: int = 16384
    layer_norm_eps: float = 1e-5
    eos_token_id: int = ENDOFTEXT_ID

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(
                f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]"
            )
        for name in ("vocab_size", "n_positions", "n_layers", "d_ff"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def real_vocab_size(self) -> int:
        """Token ids that may be sampled; GPT-J pads 50257 real tokens to 50400 rows."""
        return min(self.vocab_size, GPT2_VOCAB_SIZE)

    def num_params(self) -> int:
        """Parameter count from the shapes (GPT-J 6B: 6,050,882,784)."""
        d, f, v = self.d_model, self.d_ff, self.vocab_size
        per_layer = 2 * d + 4 * d * d + (d * f + f) + (f * d + d)
        return v * d + self.n_layers * per_layer + 2 * d + d * v + v

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `GPTJConfig` fields for these shapes."""
        return {
            "model_type": "gptj",
            "architectures": ["GPTJForCausalLM"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_embd": self.d_model,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "rotary_dim": self.rotary_dim,
            "n_inner": self.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": self.layer_norm_eps,
            "bos_token_id": ENDOFTEXT_ID,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": False,
        }

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "GPTJConfig":
        """Build from a Hugging Face config.json; refuses anything that is not GPT-J."""
        model_type = hf.get("model_type")
        if model_type != "gptj":
            raise ConfigError(f"config.json has model_type={model_type!r}; expected 'gptj'")
        activation = hf.get("activation_function", "gelu_new")
        if activation != "gelu_new":
            raise ConfigError(f"activation_function={activation!r} is not supported (GPT-J uses 'gelu_new')")
        if hf.get("tie_word_embeddings", False):
            raise ConfigError("tie_word_embeddings=true: GPT-J's lm_head is not tied to the embedding")
        d_model = int(hf["n_embd"])
        n_heads = int(hf["n_head"])
        rotary_dim = hf.get("rotary_dim")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            n_positions=int(hf.get("n_positions", 2048)),
            d_model=d_model,
            n_layers=int(hf["n_layer"]),
            n_heads=n_heads,
            rotary_dim=int(rotary_dim) if rotary_dim is not None else d_model // n_heads,
            d_ff=int(hf.get("n_inner") or 4 * d_model),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            eos_token_id=int(hf.get("eos_token_id", ENDOFTEXT_ID)),
        )


PRESETS: dict[str, GPTJConfig] = {
    "gptj-6b": GPTJConfig(),
    "small": GPTJConfig(d_model=512, n_layers=8, n_heads=8, rotary_dim=32, d_ff=2048),
    "tiny": GPTJConfig(d_model=64, n_layers=2, n_heads=4, rotary_dim=8, d_ff=256),
}


def preset(name: str) -> GPTJConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}") from None
