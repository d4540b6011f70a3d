"""The JAX GPT-J matches transformers' PyTorch GPTJForCausalLM (float32) on random checkpoints."""

import json

import numpy as np
import pytest

from model import ckpt
from model import generate
from model.nn import transformer
from tests.helpers import PARITY_CONFIGS, make_hf_checkpoint


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS))
def parity_case(request, tmp_path_factory):
    cfg = PARITY_CONFIGS[request.param]
    case = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), cfg, seed=len(request.param))
    return case, ckpt.load(case.path, progress=False)


def test_logits_match_transformers(parity_case):
    case, loaded = parity_case
    tokens = np.random.RandomState(1).randint(0, case.cfg.vocab_size, (3, 24))
    ours = np.asarray(transformer.full_logits(loaded.weights, loaded.cfg, tokens))
    theirs = case.torch_logits(tokens)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1e-4


def test_greedy_32_tokens_match_transformers(parity_case, capsys):
    case, _ = parity_case
    prompt = np.random.RandomState(2).randint(0, case.cfg.vocab_size, 7).tolist()
    expected = case.torch_greedy(prompt, 32)
    assert generate.main(["--checkpoint", case.path, "--prompt-ids", ",".join(map(str, prompt)),
                          "--max-tokens", "32", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["prompt_ids"] == prompt
    assert line["token_ids"] == expected


def test_cli_logprobs_match_transformers_log_softmax(parity_case, capsys):
    case, _ = parity_case
    prompt = [5, 17, 42, 3]
    assert generate.main(["--checkpoint", case.path, "--prompt-ids", "5,17,42,3", "--max-tokens", "12",
                          "--temperature", "0.9", "--top-k", "40", "--seed", "7", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 12
    full = np.array(prompt + out["token_ids"])[None]
    logits = case.torch_logits(full)[0].astype(np.float64)
    real = logits[:, : min(case.cfg.vocab_size, 50257)]
    logp = real - np.log(np.exp(real - real.max(-1, keepdims=True)).sum(-1, keepdims=True)) - real.max(-1, keepdims=True)
    expected = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(out["token_ids"])]
    np.testing.assert_allclose(out["logprobs"], expected, atol=1e-4)
