"""Prompt scores, penalties, logit bias and min_tokens on the paged engine, against transformers'
PyTorch GPT-J: prompt logprobs and their top tokens equal its log-softmax (whole prompts and chunked
ones, batched with rows that do not ask), greedy decoding under each penalty and bias equals a plain
loop over its logits, a request's penalties never touch its neighbours, min_tokens holds against a
boosted EOS, and nothing compiles after warm-up."""

import collections

import numpy as np
import pytest

from model import ckpt
from model.engine.compilations import compilation_count
from model.engine.paged import EngineConfig, PagedEngine
from model.serving.driver import Driver
from model.serving.request import Request
from model.text.tokenizer import Tokenizer

# Chunks of 16 tokens: a 7-token prompt is prefilled whole (bucket 8), a 30-token one in two chunks.
CONFIG = EngineConfig(prompt_buckets=(8, 32), batch_buckets=(1, 4), slots=4, max_cache_len=64, page_size=8,
                      prefill_chunk_tokens=16)
PROMPTS = [[5, 9, 2, 7, 1, 400, 33], [3, 3, 8, 11, 12, 13, 14, 15, 16, 2, 4, 900, 17, 17, 17, 1, 2, 3, 4, 5] + list(range(40, 50))]


@pytest.fixture(scope="module")
def loaded(hf_checkpoint):
    return ckpt.load(hf_checkpoint.path, progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def engine(loaded):
    engine = PagedEngine(loaded.weights, loaded.cfg, CONFIG)
    engine.warmup(progress=False)
    return engine


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    return logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)


def reference_scores(hf_checkpoint, prompt):
    """transformers' logprob of every prompt token after the first, and its 5 best there."""
    vocab = hf_checkpoint.cfg.real_vocab_size
    logp = log_softmax(hf_checkpoint.torch_logits([prompt])[0, :, :vocab])
    chosen = [logp[i - 1, prompt[i]] for i in range(1, len(prompt))]
    best = [dict((int(t), logp[i - 1, t]) for t in np.argsort(-logp[i - 1])[:5]) for i in range(1, len(prompt))]
    return chosen, best


def test_prompt_logprobs_equal_transformers(engine, hf_checkpoint, tokenizer):
    """Whole and chunked prompts, beside a request that does not ask and one that only scores."""
    before = compilation_count()  # process-wide: count this run's only
    asked = [Request(p, 3, prompt_logprobs=5, top_logprobs=4, request_id=f"asks-{i}") for i, p in enumerate(PROMPTS)]
    plain = Request(PROMPTS[0], 3, request_id="plain")
    scored_only = Request(PROMPTS[1], 0, prompt_logprobs=2, request_id="max-tokens-0")
    driver = Driver(engine, tokenizer)
    results = driver.generate(asked + [plain, scored_only])
    assert driver.stats["prefill_chunks"] == 4  # the 30-token prompt, twice
    for prompt, result in zip(PROMPTS, results):
        chosen, best = reference_scores(hf_checkpoint, prompt)
        assert result.prompt_logprobs[0] is None and result.prompt_top_logprobs[0] is None
        np.testing.assert_allclose(result.prompt_logprobs[1:], chosen, atol=1e-4)
        for got, want in zip(result.prompt_top_logprobs[1:], best):
            assert list(got) == list(want)  # the same tokens, best first
            np.testing.assert_allclose(list(got.values()), list(want.values()), atol=1e-4)
        assert len(result.token_ids) == 3
        # the generated tokens' top logprobs (the first from the prefill, then decode steps)
        chosen, best = reference_scores(hf_checkpoint, prompt + result.token_ids)
        for got, want in zip(result.top_logprobs, best[len(prompt) - 1 :]):
            assert list(got) == list(want)[:4]
            np.testing.assert_allclose(list(got.values()), list(want.values())[:4], atol=1e-4)
    assert results[2].prompt_logprobs is None and results[2].token_ids == results[0].token_ids
    only = results[3]
    assert only.token_ids == [] and only.finish_reason == "length" and len(only.prompt_top_logprobs[1]) == 2
    np.testing.assert_allclose(only.prompt_logprobs[1:], results[1].prompt_logprobs[1:], atol=1e-6)
    assert compilation_count() == before


def reference_greedy(hf_checkpoint, prompt, n, *, presence=0.0, frequency=0.0, repetition=1.0, bias=None,
                     min_tokens=0, suppressed=()):
    """Greedy decoding as a plain loop over transformers' logits, penalties applied by hand (vLLM's order)."""
    vocab = hf_checkpoint.cfg.real_vocab_size
    seq, out = list(prompt), []
    for step in range(n):
        logits = hf_checkpoint.torch_logits([seq])[0, -1, :vocab].astype(np.float64)
        for token, b in (bias or {}).items():
            logits[token] += b
        if step < min_tokens:
            logits[list(suppressed)] = -np.inf
        for token in set(seq):
            logits[token] = logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
        for token, count in collections.Counter(out).items():
            logits[token] -= frequency * count + presence
        out.append(int(np.argmax(logits)))
        seq.append(out[-1])
    return out


def test_greedy_under_each_penalty_and_bias_equals_a_reference_loop(engine, hf_checkpoint, tokenizer):
    prompt, n = [17, 17, 4, 250, 17, 9], 12
    plain = reference_greedy(hf_checkpoint, prompt, n)
    settings = [
        dict(presence_penalty=1.5), dict(frequency_penalty=0.7), dict(repetition_penalty=1.8),
        dict(logit_bias=((plain[1], -100.0), (123, 5.0))),
        dict(presence_penalty=-0.5, frequency_penalty=0.3, repetition_penalty=1.2, logit_bias=((plain[0], -3.0),)),
    ]
    requests = [Request(prompt, n, request_id=f"r{i}", **s) for i, s in enumerate(settings)]
    results = Driver(engine, tokenizer).generate(requests)
    for s, result in zip(settings, results):
        expected = reference_greedy(hf_checkpoint, prompt, n, presence=s.get("presence_penalty", 0.0),
                                    frequency=s.get("frequency_penalty", 0.0),
                                    repetition=s.get("repetition_penalty", 1.0), bias=dict(s.get("logit_bias", ())))
        assert result.token_ids == expected, s
        assert result.token_ids != plain, s  # each setting changes something here
    # transformers' own repetition penalty agrees
    import torch

    with torch.no_grad():
        hf = hf_checkpoint.torch_model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                                do_sample=False, repetition_penalty=1.8, pad_token_id=0,
                                                attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    assert results[2].token_ids == hf[0, len(prompt):].tolist()


def test_reported_logprobs_stay_the_models_own(engine, tokenizer):
    prompt = [17, 17, 4, 250, 17, 9]
    plain, biased = Driver(engine, tokenizer).generate([Request(prompt, 6), Request(prompt, 6, logit_bias=((3, 100.0),))])
    assert biased.token_ids == [3] * 6
    assert all(lp < -1 for lp in biased.logprobs)  # the bias does not make the model sure of token 3
    assert plain.token_ids != biased.token_ids


def test_penalties_never_reach_a_neighbour(engine, tokenizer):
    prompt = [17, 17, 4, 250, 17, 9]
    before = compilation_count()
    alone = Driver(engine, tokenizer).generate([Request(prompt, 10, temperature=0.8, seed=4)])[0]
    mixed = Driver(engine, tokenizer).generate([
        Request(prompt, 10, repetition_penalty=3.0, frequency_penalty=2.0, logit_bias=((1, 50.0),), request_id="a"),
        Request(prompt, 10, temperature=0.8, seed=4, request_id="b"),
        Request(prompt, 10, presence_penalty=-2.0, min_tokens=10, request_id="c"),
    ])
    assert mixed[1].token_ids == alone.token_ids
    np.testing.assert_allclose(mixed[1].logprobs, alone.logprobs, atol=1e-5)
    assert compilation_count() == before


def test_min_tokens_holds_against_a_boosted_stop_token(engine, hf_checkpoint, tokenizer):
    """min_tokens holds back the request's stop tokens (and EOS, the same way: the driver adds it to
    them; tests/app/test_openai_api.py boosts the real EOS over HTTP)."""
    before = compilation_count()
    stop = 77
    boost = ((stop, 100.0),)
    early, held = Driver(engine, tokenizer).generate([
        Request([1, 2, 3], 20, stop_token_ids=[stop], logit_bias=boost, request_id="early"),
        Request([1, 2, 3], 20, stop_token_ids=[stop, 5], logit_bias=boost, min_tokens=5, request_id="held"),
    ])
    assert early.token_ids == [] and early.finish_reason == "stop"
    assert len(held.token_ids) == 5 and stop not in held.token_ids and held.finish_reason == "stop"
    assert held.token_ids == reference_greedy(hf_checkpoint, [1, 2, 3], 5, bias={stop: 100.0}, min_tokens=5,
                                              suppressed=[stop, 5])
    assert compilation_count() == before
