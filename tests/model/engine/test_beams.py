"""Beam search on the paged engine against transformers' `generate(num_beams=..., early_stopping=True)`
on random checkpoints: the best beam's tokens, every finished beam's tokens and their scores
(`sequences_scores`), with beams that end on EOS early, length penalties other than 1 and
min_tokens; unchanged among neighbours joining and leaving, through preemption, chunked prefill
and prefix caching; a cancelled beam request gives every page back; nothing compiles after warm-up."""

import dataclasses
import json
import random

import numpy as np
import pytest

from model import ckpt
from model.engine.paged import EngineConfig, PagedEngine
from model.serving.driver import Driver
from model.serving.request import Request
from model.text.tokenizer import Tokenizer
from tests.helpers import PARITY_CONFIGS, TEST_CONFIG, make_hf_checkpoint

# page 8, 64 positions; 8 slots: two 4-beam requests, or one and four single requests, at a time.
CONFIG = EngineConfig(prompt_buckets=(8, 16, 32), batch_buckets=(1, 2, 4), slots=8, max_cache_len=64, page_size=8)

# (model config, seed): EOS is a token these random models like, so beams end on it early.
CHECKPOINTS = {
    "v1000": (dataclasses.replace(TEST_CONFIG, eos_token_id=639), 1),
    "v517": (dataclasses.replace(PARITY_CONFIGS["h2_rot16_v517"], eos_token_id=244), 3),
}


ONE_CHECKPOINT = pytest.mark.parametrize("model", ["v1000"], indirect=True)  # the rest on one model: CI time


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def model(request, tmp_path_factory):
    cfg, seed = CHECKPOINTS[request.param]
    hf = make_hf_checkpoint(tmp_path_factory.mktemp(f"beams_{request.param}"), cfg, seed=seed)
    engine = PagedEngine(ckpt.load(hf.path, progress=False).weights, cfg, CONFIG)
    engine.warmup(progress=False)
    return hf, engine


def reference(hf, r: Request) -> tuple[list[list[int]], list[float]]:
    """transformers' beam search: every returned beam's generated tokens (up to and with EOS) and score."""
    import torch

    with torch.no_grad():
        out = hf.torch_model.generate(
            torch.tensor([list(r.prompt_ids)]), attention_mask=torch.ones(1, len(r.prompt_ids), dtype=torch.long),
            num_beams=r.num_beams, num_return_sequences=r.num_beams, early_stopping=r.early_stopping,
            length_penalty=r.length_penalty, min_new_tokens=r.min_tokens, max_new_tokens=r.max_tokens,
            do_sample=False, eos_token_id=hf.cfg.eos_token_id, pad_token_id=0, return_dict_in_generate=True,
            output_scores=True)
    beams = []
    for row in out.sequences[:, len(r.prompt_ids):].tolist():
        eos = hf.cfg.eos_token_id
        beams.append(row[: row.index(eos) + 1] if eos in row else row)
    return beams, out.sequences_scores.tolist()


def beam_requests(rng, vocab, n) -> list[Request]:
    return [Request(prompt_ids=[rng.randrange(vocab) for _ in range(rng.randint(2, 30))],
                    max_tokens=rng.randint(4, 30), num_beams=rng.choice([2, 3, 4]),
                    length_penalty=rng.choice([1.0, 0.5, 2.0, -1.0]), min_tokens=rng.choice([0, 0, 3]))
            for _ in range(n)]


def assert_same_as_transformers(hf, r: Request, result) -> None:
    beams, scores = reference(hf, r)
    assert result.token_ids == beams[0], r
    assert [b.token_ids for b in result.beams] == beams, r
    np.testing.assert_allclose(result.score, scores[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([b.score for b in result.beams], scores, rtol=1e-5, atol=1e-5)
    assert len(result.token_ids) >= r.min_tokens
    assert result.finish_reason == ("stop" if result.token_ids[-1] == hf.cfg.eos_token_id else "length")


def test_beam_search_equals_transformers(model, tokenizer):
    """Ten beam requests at once (they wait for slots and join as others end), each equal to
    transformers' beam search alone; some of the best beams end on EOS, early."""
    hf, engine = model
    requests = beam_requests(random.Random(7), hf.cfg.real_vocab_size, 10)
    results = Driver(engine, tokenizer).generate(requests)
    for r, result in zip(requests, results):
        assert_same_as_transformers(hf, r, result)
    eos = hf.cfg.eos_token_id
    ended_early = [res for r, res in zip(requests, results) if res.token_ids[-1] == eos and len(res.token_ids) < r.max_tokens]
    assert ended_early, "no best beam ended on EOS before max_tokens: the checkpoint does not exercise it"
    assert engine.compilations_since_warmup == 0


@ONE_CHECKPOINT
def test_beams_are_unaffected_by_neighbours_joining_and_leaving(model, tokenizer):
    """A beam request alone, and among greedy and sampled requests submitted step after step and
    other beam requests: the same beams and scores."""
    hf, engine = model
    rng = random.Random(11)
    vocab = hf.cfg.real_vocab_size
    target = Request(prompt_ids=[rng.randrange(vocab) for _ in range(13)], max_tokens=20, num_beams=4)
    alone = Driver(engine, tokenizer).generate([target])[0]

    driver = Driver(engine, tokenizer)
    results = {}
    def submit(r):
        results[r.request_id] = []
        driver.submit(r, results[r.request_id].append)
    neighbours = [Request(prompt_ids=[rng.randrange(vocab) for _ in range(rng.randint(1, 30))],
                          max_tokens=rng.randint(1, 20), temperature=rng.choice([0.0, 0.8]), seed=i)
                  for i in range(6)] + beam_requests(rng, vocab, 2)
    submit(neighbours[0])
    driver.step()
    submit(target)
    for r in neighbours[1:]:
        driver.step()
        submit(r)
    while driver.has_work():
        driver.step()
    among = results[target.request_id][-1]
    assert among.token_ids == alone.token_ids and among.score == pytest.approx(alone.score, abs=1e-5)
    assert [b.token_ids for b in among.beams] == [b.token_ids for b in alone.beams]
    assert driver.kv_usage()["kv_pages_used"] == 0
    assert engine.compilations_since_warmup == 0


@ONE_CHECKPOINT
def test_cancelling_a_beam_request_frees_every_page(model, tokenizer):
    hf, engine = model
    driver = Driver(engine, tokenizer)
    outputs = []
    request = Request(prompt_ids=list(range(1, 20)), max_tokens=30, min_tokens=30, num_beams=4)
    driver.submit(request, outputs.append)
    for _ in range(12):  # past a page boundary: the beams hold pages of their own
        driver.step()
    assert driver.active_slots == 4 and driver.kv_usage()["kv_pages_used"] > 4
    driver.cancel(request.request_id)
    while driver.has_work():
        driver.step()
    assert [o.finish_reason for o in outputs] == ["cancelled"]
    assert driver.active_slots == 0 and driver.kv_usage()["kv_pages_used"] == 0
    assert driver._scheduler.pages.pages_free == engine.page_layout.num_pages  # nothing left reserved either


@pytest.fixture(scope="module")
def variants(model):
    """The same weights with a pool too small for every beam at once (preemption), and with chunked
    prefill and prefix caching."""
    hf, engine = model
    small = PagedEngine(engine.weights, hf.cfg, dataclasses.replace(CONFIG, num_pages=20))
    caching = PagedEngine(engine.weights, hf.cfg, dataclasses.replace(CONFIG, prefill_chunk_tokens=16,
                                                                       enable_prefix_caching=True))
    return small, caching  # each warmed up where it is used (compilations are counted process-wide)


@ONE_CHECKPOINT
def test_beams_survive_preemption_chunked_prefill_and_prefix_caching(model, variants, tokenizer):
    """Beam requests with long shared prompts on a pool that runs out (the youngest beam request is
    preempted and starts again) and on an engine that chunks prompts and caches their pages: the
    same results as on the plain engine."""
    hf, engine = model
    rng = random.Random(5)
    shared = [rng.randrange(hf.cfg.real_vocab_size) for _ in range(20)]
    requests = [Request(prompt_ids=shared + [i, i + 1], max_tokens=24, num_beams=rng.choice([2, 4]),
                        length_penalty=0.5) for i in range(5)]
    expected = Driver(engine, tokenizer).generate(requests)
    for variant, counter in zip(variants, ("preemptions", "prefix_cache_hits")):
        variant.warmup(progress=False)
        driver = Driver(variant, tokenizer)
        results = driver.generate(requests)
        for want, got in zip(expected, results):
            assert got.token_ids == want.token_ids and got.score == pytest.approx(want.score, abs=1e-5)
            assert [b.token_ids for b in got.beams] == [b.token_ids for b in want.beams]
        assert driver.stats[counter] > 0, counter
        assert driver.kv_usage()["kv_pages_used"] == 0 and variant.compilations_since_warmup == 0


@ONE_CHECKPOINT
def test_cli_beam_search_prints_the_best_beam_its_score_and_every_beam(model, capsys):
    from model import generate

    hf, _ = model
    r = Request(prompt_ids=[5, 17, 42, 3, 99], max_tokens=16, num_beams=3, length_penalty=0.5, min_tokens=2)
    assert generate.main(["--checkpoint", hf.path, "--prompt-ids", "5,17,42,3,99", "--max-tokens", "16",
                          "--num-beams", "3", "--length-penalty", "0.5", "--min-tokens", "2", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    beams, scores = reference(hf, r)
    assert line["token_ids"] == beams[0] and line["score"] == pytest.approx(scores[0], abs=1e-5)
    assert [b["token_ids"] for b in line["beams"]] == beams
    assert [b["score"] for b in line["beams"]] == pytest.approx(scores, abs=1e-5)
    assert line["text"] == line["beams"][0]["text"] and len(line["logprobs"]) == len(line["token_ids"])
    assert generate.main(["--checkpoint", hf.path, "--prompt-ids", "5", "--max-tokens", "4", "--num-beams", "2",
                          "--temperature", "0.5"]) == 2
    assert "temperature is not supported with beam search" in capsys.readouterr().err
