"""Test helpers: random Hugging Face GPT-J checkpoints and the transformers reference model."""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from model.nn.config import GPTJConfig

# Small configs that exercise the quirks: rotary_dim < head_dim, odd vocab sizes, head counts.
# TEST_CONFIG's vocab divides by 4 so it also runs on the 4-device mesh (vocab is sharded).
TEST_CONFIG = GPTJConfig(vocab_size=1000, n_positions=256, d_model=64, n_layers=2, n_heads=4, rotary_dim=8, d_ff=192)
PARITY_CONFIGS = {
    "h4_rot8_v1000": TEST_CONFIG,
    "h2_rot16_v517": GPTJConfig(vocab_size=517, n_positions=128, d_model=96, n_layers=3, n_heads=2, rotary_dim=16, d_ff=160),
    "h8_rot4_v2048": GPTJConfig(vocab_size=2048, n_positions=128, d_model=64, n_layers=2, n_heads=8, rotary_dim=4, d_ff=256),
    "h4_rotfull_v999": GPTJConfig(vocab_size=999, n_positions=128, d_model=32, n_layers=1, n_heads=4, rotary_dim=8, d_ff=64),
}


@dataclasses.dataclass
class HFCheckpoint:
    path: str
    cfg: GPTJConfig

    @functools.cached_property
    def torch_model(self):
        from transformers import GPTJForCausalLM

        return GPTJForCausalLM.from_pretrained(self.path, dtype="float32").eval()

    def torch_logits(self, tokens) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.torch_model(torch.tensor(np.asarray(tokens))).logits.numpy()

    def torch_greedy(self, prompt: list[int], n: int) -> list[int]:
        import torch

        with torch.no_grad():
            out = self.torch_model.generate(
                torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0,
            )
        return out[0, len(prompt):].tolist()


def make_hf_checkpoint(directory, cfg: GPTJConfig = TEST_CONFIG, seed: int = 0, **save_kwargs) -> HFCheckpoint:
    """Build a random GPT-J with transformers and save it (safetensors) into `directory`.

    Weights are drawn with a larger std than transformers' init so logits are far from uniform and
    greedy decoding is a meaningful comparison."""
    import torch
    from transformers import GPTJConfig as HFConfig
    from transformers import GPTJForCausalLM

    torch.manual_seed(seed)
    model = GPTJForCausalLM(HFConfig(**cfg.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(str(directory), **save_kwargs)
    return HFCheckpoint(os.fspath(directory), cfg)


def json_rows(stdout: str) -> list[dict]:
    """The JSON lines a CLI printed. A process connected to a Ray cluster also gets what the cluster's
    processes print (Ray's log monitor writes it to this process's stdout, e.g. a raylet warning about
    worker counts), at any moment: those lines are not the CLI's and are skipped."""
    import json

    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
