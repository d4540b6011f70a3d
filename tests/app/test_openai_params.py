"""The OpenAI and vLLM parameters real clients send, without Ray: how app.schemas parses them, how
app.completions plans them into engine requests and refuses what cannot be served (400 naming the
field), and how the assembler answers (echoed prompt scores, top logprobs, best_of, usage)."""

import pytest
from pydantic import ValidationError

from app.completions import CompletionAssembler, ServerPolicy, plan_completion
from app.protocol import Chunk, InvalidRequest
from app.schemas import CompletionRequest, StreamOptions
from model.serving.output import Beam
from model.serving.request import Limits
from model.text.tokenizer import Tokenizer

LIMITS = Limits(vocab_size=50257, max_total_length=128, prompt_buckets=(16, 64), max_top_logprobs=5, max_beams=4)
POLICY = ServerPolicy(default_max_tokens=16, max_n=8, max_choices=32, max_stops=16)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


def request(**fields) -> CompletionRequest:
    return CompletionRequest(model="m", **{"prompt": "Hello world", **fields})


def plan(tokenizer, **fields):
    return plan_completion(request(**fields), tokenizer, LIMITS, POLICY)


def test_null_is_the_default_for_every_nullable_field():
    body = ('{"model": "m", "prompt": "x", "temperature": null, "top_p": null, "n": null, "echo": null, '
            '"stream": null, "presence_penalty": null, "frequency_penalty": null, "logit_bias": null, '
            '"best_of": null, "stop": null, "logprobs": null, "max_tokens": null, "seed": null, "user": null, '
            '"top_k": null, "min_tokens": null, "repetition_penalty": null, "ignore_eos": null, "suffix": null}')
    parsed = CompletionRequest.model_validate_json(body, strict=True)
    assert (parsed.temperature, parsed.top_p, parsed.n, parsed.echo, parsed.presence_penalty, parsed.top_k,
            parsed.repetition_penalty, parsed.min_tokens) == (1.0, 1.0, 1, False, 0.0, 0, 1.0, 0)
    with pytest.raises(ValidationError, match="prompt"):
        CompletionRequest.model_validate_json('{"model": "m", "prompt": null}', strict=True)


def test_settings_reach_the_engine_request(tokenizer):
    [r] = plan(tokenizer, top_k=-1, presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.3,
               logit_bias={"50256": -100, "11": 2.5}, min_tokens=3, stop_token_ids=[13], logprobs=3).requests
    assert (r.top_k, r.presence_penalty, r.frequency_penalty, r.repetition_penalty, r.min_tokens) == (
        0, 0.5, -1.0, 1.3, 3)
    assert r.logit_bias == ((50256, -100.0), (11, 2.5)) and r.stop_token_ids == (13,)
    assert (r.top_logprobs, r.prompt_logprobs) == (3, None)  # no echo: the prompt is not scored
    [echoed] = plan(tokenizer, echo=True, logprobs=2).requests
    assert echoed.prompt_logprobs == 2
    [scored] = plan(tokenizer, echo=True, max_tokens=0).requests  # lm-eval's loglikelihood shape
    assert (scored.max_tokens, scored.prompt_logprobs) == (0, 0)


@pytest.mark.parametrize("fields,param,message", [
    ({"stream_options": StreamOptions(include_usage=True)}, "stream_options", "only be set when stream is true"),
    ({"max_tokens": 0}, "max_tokens", "0 only with echo"),
    ({"logprobs": 6}, "logprobs", "at most 5"),
    ({"stop": [str(i) for i in range(17)]}, "stop", "at most 16 stop sequences"),
    ({"n": 3, "best_of": 2}, "best_of", "best_of must be in [n=3, 8]"),
    ({"best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
    ({"logit_bias": {"50257": 1.0}}, "logit_bias", "outside the vocabulary"),
    ({"min_tokens": 17}, "min_tokens", "min_tokens must be an integer in [0, max_tokens=16]"),
    ({"stop_token_ids": list(range(16))}, "stop_token_ids", "at most 15 stop token ids"),
    ({"use_beam_search": True, "best_of": 2, "temperature": 0.7}, "temperature", "temperature must be 0"),
    ({"use_beam_search": True, "best_of": 2, "presence_penalty": 1.0}, "num_beams", "not supported with beam"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(tokenizer, fields, param, message):
    with pytest.raises(InvalidRequest) as e:
        plan(tokenizer, **fields)
    assert e.value.param == param and e.value.status_code == 400
    assert message in e.value.message


@pytest.mark.parametrize("fields", [{"presence_penalty": 2.5}, {"frequency_penalty": -3}, {"repetition_penalty": 0},
                                    {"logit_bias": {"a": 1}}, {"logit_bias": {"5": 101}}, {"top_k": -2},
                                    {"max_tokens": -1}])
def test_out_of_range_settings_are_refused_by_the_schema(fields):
    with pytest.raises(ValidationError) as e:
        request(**fields)
    assert e.value.errors()[0]["loc"][0] == next(iter(fields))


def test_sixteen_stops_and_beam_search_plans(tokenizer):
    assert len(plan(tokenizer, stop=[str(i) for i in range(16)]).requests[0].stop) == 16
    beams = plan(tokenizer, use_beam_search=True, best_of=3, n=2, length_penalty=0.5)
    [r] = beams.requests
    assert (r.num_beams, r.temperature, r.length_penalty, beams.candidates) == (3, 0.0, 0.5, 1)


def test_echo_with_logprobs_scores_the_prompt_and_the_completion(tokenizer):
    """What lm-evaluation-harness reads: token_logprobs over prompt then completion (the first None),
    top_logprobs with the chosen token added when outside the top N, offsets over the echoed text."""
    req = request(prompt=[15496, 995], echo=True, logprobs=1, max_tokens=1)  # "Hello world"
    p = plan_completion(req, tokenizer, LIMITS, POLICY)
    asm = CompletionAssembler(req, p, "m", tokenizer)
    rid = p.requests[0].request_id
    chunk = Chunk(rid, [11], [-0.5], ",", finish_reason="length", top_logprobs=[{13: -0.25, 11: -0.5}],
                  prompt_logprobs=[None, -3.0], prompt_top_logprobs=[None, {0: -1.0, 995: -3.0}])
    event = asm.add(chunk).choices[0]
    assert event.text == "Hello world,"
    assert event.logprobs.tokens == ["Hello", " world", ","]
    assert event.logprobs.token_logprobs == [None, -3.0, -0.5]
    assert event.logprobs.top_logprobs == [None, {"!": -1.0, " world": -3.0}, {".": -0.25, ",": -0.5}]
    assert event.logprobs.text_offset == [0, 5, 11]
    response = asm.response().choices[0]
    assert response.logprobs == event.logprobs and response.text == "Hello world,"


def test_best_of_returns_the_n_best_by_cumulative_logprob_and_counts_every_candidate(tokenizer):
    req = request(prompt=["a", "b"], n=1, best_of=3)
    p = plan_completion(req, tokenizer, LIMITS, POLICY)
    assert len(p.requests) == 6 and p.candidates == 3
    asm = CompletionAssembler(req, p, "m", tokenizer)
    scores = [[-1.0, -1.0], [-0.5, -0.5], [-3.0], [-0.1], [-2.0, -2.0], [-0.2, -0.2]]
    for r, lps in zip(p.requests, scores):
        asm.add(Chunk(r.request_id, [11] * len(lps), lps, "," * len(lps), finish_reason="length"))
    response = asm.response()
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == [",,", ","]  # candidate 1 (-1.0) of prompt a, 3 (-0.1) of b
    assert response.usage.completion_tokens == 10 and response.usage.prompt_tokens == 2


def test_continuous_usage_stats_in_every_event(tokenizer):
    req = request(stream=True, stream_options=StreamOptions(include_usage=True, continuous_usage_stats=True))
    p = plan_completion(req, tokenizer, LIMITS, POLICY)
    asm = CompletionAssembler(req, p, "m", tokenizer)
    rid = p.requests[0].request_id
    assert asm.add(Chunk(rid, [11], [-1.0], ",")).usage.completion_tokens == 1
    assert asm.add(Chunk(rid, [13, 13], [-1.0, -1.0], "..", finish_reason="length")).usage.total_tokens == 2 + 3


def test_beam_search_returns_the_best_beams_as_the_choices(tokenizer):
    req = request(use_beam_search=True, best_of=3, n=2, temperature=0, max_tokens=3, return_token_ids=True)
    p = plan_completion(req, tokenizer, LIMITS, POLICY)
    asm = CompletionAssembler(req, p, "m", tokenizer)
    beams = [Beam([11, 13, 50256], [-0.1, -0.2, -0.3], ",.", -0.2), Beam([13, 13, 13], [-0.5] * 3, "...", -0.5),
             Beam([0, 0, 0], [-1.0] * 3, "!!!", -1.0)]
    asm.add(Chunk(p.requests[0].request_id, [11, 13, 50256], [-0.1, -0.2, -0.3], ",.", finish_reason="stop",
                  beams=beams))
    response = asm.response()
    assert [(c.index, c.text, c.finish_reason, c.token_ids) for c in response.choices] == [
        (0, ",.", "stop", [11, 13]), (1, "...", "length", [13, 13, 13])]
    assert response.usage.completion_tokens == 5
