"""app.completions and app.schemas, without Ray: request schemas, planning, response assembly."""

import dataclasses

import pytest
from pydantic import ValidationError

from app.args import AppArgs
from app.completions import (
    CompletionAssembler,
    ServerPolicy,
    default_request_bytes,
    longest_token_bytes,
    plan_completion,
    plan_saxml,
    saxml_answer,
    tokenize_prompts,
)
from app.protocol import Chunk, InvalidRequest
from app.schemas import CompletionRequest, SaxmlGenerateRequest, prompt_list
from model.serving.output import Beam
from model.serving.request import Limits
from model.text.tokenizer import Tokenizer

LIMITS = Limits(vocab_size=50257, max_total_length=128, prompt_buckets=(16, 64))
POLICY = ServerPolicy(default_max_tokens=16, max_n=8, max_choices=32)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


def request(**fields) -> CompletionRequest:
    return CompletionRequest(model="m", **{"prompt": "Hello world", **fields})


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1], [2, 3]]])
def test_prompt_forms(prompt):
    assert request(prompt=prompt).prompt == prompt


@pytest.mark.parametrize("prompt", [True, [True, 2], ["1", 2], [[1], ["a"]], 1.5, "", [], [[]], ["a", ""]])
def test_bad_prompts(prompt):
    with pytest.raises(ValidationError) as e:
        request(prompt=prompt)
    assert e.value.errors()[0]["loc"][0] == "prompt"


def test_plan_expands_prompts_and_choices(tokenizer):
    plan = plan_completion(request(prompt=[[1, 2], [3]], n=3, seed=10, ignore_eos=True), tokenizer, LIMITS, POLICY)
    assert [r.prompt_ids for r in plan.requests] == [[1, 2]] * 3 + [[3]] * 3
    assert [r.seed for r in plan.requests] == [10, 11, 12] * 2  # choice j of each prompt: seed + j
    assert all(r.max_tokens == 16 and not r.stop_at_eos for r in plan.requests)
    assert len({r.request_id for r in plan.requests}) == 6
    big = plan_completion(request(n=2, seed=2**31 - 1), tokenizer, LIMITS, POLICY)
    assert [r.seed for r in big.requests] == [2**31 - 1, 0]  # wrapped into the engine's int32


@pytest.mark.parametrize("seed", [-1, 2**31, 2**64])
def test_seeds_outside_int32_are_refused(seed):
    with pytest.raises(ValidationError, match="seed"):
        request(seed=seed)


def test_handle_instances_are_validated_again():
    bogus = CompletionRequest.model_construct(model="m", prompt=12, n=1)
    with pytest.raises(ValidationError, match="prompt"):
        CompletionRequest.model_validate(bogus)


@pytest.mark.parametrize("fields,param,message", [
    ({"n": 9}, "n", "n must be in [1, 8]"),
    ({"prompt": [50257]}, "prompt", "outside the vocabulary"),
    ({"prompt": [1] * 65}, "prompt", "prompt has 65 tokens"),
    ({"prompt": [1] * 60, "max_tokens": 69}, "max_tokens", "exceeds the context limit of 128"),
    ({"prompt": ["a"] * 8, "n": 5}, "n", "8 prompts x n=5 = 40 completions; at most 32"),
    ({"prompt": ["a"] * 9}, "prompt", "9 prompts; at most 8 per request"),
])
def test_plan_rejections(tokenizer, fields, param, message):
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[")) as e:
        plan_completion(request(**fields), tokenizer, LIMITS, POLICY)
    assert e.value.param == param and e.value.status_code == 400


def test_assembler_echo_usage_logprobs(tokenizer):
    req = request(prompt=["Hello world", "Hi"], n=2, logprobs=0, return_token_ids=True)
    plan = plan_completion(req, tokenizer, LIMITS, POLICY)
    asm = CompletionAssembler(req, plan, "m", tokenizer)
    first, second = [r.request_id for r in plan.requests[:2]]
    ids = tokenizer.encode(" one two")
    event = asm.add(Chunk(first, ids[:1], [-1.0], tokenizer.decode(ids[:1])))
    assert event.choices[0].index == 0 and event.choices[0].logprobs.text_offset == [0]
    event = asm.add(Chunk(first, ids[1:], [-2.0], tokenizer.decode(ids[1:]), finish_reason="length"))
    assert event.choices[0].logprobs.text_offset == [len(" one")]  # offsets run on across chunks
    asm.add(Chunk(second, [11], [-0.5], ",", finish_reason="stop"))
    for r in plan.requests[2:]:
        asm.add(Chunk(r.request_id, [], [], "", finish_reason="stop"))
    response = asm.response()
    assert response.choices[0].text == " one two" and response.choices[0].token_ids == ids
    assert response.choices[0].logprobs.token_logprobs == [-1.0, -2.0]
    assert [c.finish_reason for c in response.choices] == ["length", "stop", "stop", "stop"]
    assert response.usage.prompt_tokens == 2 + 1  # each prompt once, whatever n
    assert response.usage.completion_tokens == 3

    echo = request(echo=True)
    plan = plan_completion(echo, tokenizer, LIMITS, POLICY)
    asm = CompletionAssembler(echo, plan, "m", tokenizer)
    rid = plan.requests[0].request_id
    assert asm.add(Chunk(rid, [11], [-1.0], ",")).choices[0].text == "Hello world,"
    assert asm.add(Chunk(rid, [13], [-1.0], ".", finish_reason="length")).choices[0].text == "."
    assert asm.response().choices[0].text == "Hello world,."


@pytest.mark.parametrize("prompt,expected", [
    ("text", ["text"]), (["a", "b"], ["a", "b"]), ([1, 2, 3], [[1, 2, 3]]), ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_prompt_list_tells_the_four_shapes_apart(prompt, expected):
    assert prompt_list(prompt) == expected


def test_tokenize_prompts(tokenizer):
    assert tokenize_prompts(["Hello world", "Hi"], tokenizer) == [tokenizer.encode(t) for t in ("Hello world", "Hi")]
    assert tokenize_prompts([[5], [6, 7]], tokenizer) == [[5], [6, 7]]


def test_policy_from_args(tokenizer):
    args = AppArgs(default_max_tokens=7, max_n=3, max_pending_requests=5, max_tokens_limit=9, max_prompts=2,
                   max_request_bytes=5000)
    assert ServerPolicy.from_args(args, tokenizer) == ServerPolicy(
        default_max_tokens=7, max_n=3, max_choices=5, max_tokens_limit=9, max_prompts=2, max_request_bytes=5000,
        token_bytes=128)


def test_default_body_limit_is_what_the_largest_valid_request_can_use():
    """max_prompts prompts of the longest bucket at 16 bytes a token, 16 stop strings of 256 characters
    escaped at 6 bytes each, 300 logit_bias entries at 32 bytes, 4 KiB for the other fields: 101 KiB
    locally (512-token bucket), not 1 MiB."""
    assert default_request_bytes(AppArgs()) == 4096 + 16 * 256 * 6 + 300 * 32 + 8 * 512 * 16 == 103808
    assert default_request_bytes(AppArgs(prompt_buckets=(128, 1919), max_prompts=1, max_stops=4)) == (
        4096 + 6144 + 9600 + 1919 * 16)
    assert ServerPolicy.from_args(AppArgs(), Tokenizer.gpt2()).max_request_bytes == 103808

def test_longest_token_bounds_the_text_a_prompt_can_have(tokenizer):
    assert longest_token_bytes(tokenizer) == 128  # GPT-2's vocabulary


def test_counts_and_text_sizes_are_refused_before_tokenising(tokenizer):
    """Too many prompts, too many choices, and a text longer than the longest prompt (in tokens) times
    the longest token (in bytes): refused without the tokenizer ever seeing the text."""

    class NoTokenizing:
        def encode(self, text):
            raise AssertionError("tokenised a request that could be refused unread")

    policy = dataclasses.replace(POLICY, max_prompts=3, max_choices=4, token_bytes=128)
    most = LIMITS.max_prompt_length * 128
    cases = [
        (request(prompt=["a"] * 4), "4 prompts; at most 3 per request", "prompt"),
        (request(prompt=["a"] * 3, n=2), "3 prompts x n=2 = 6 completions; at most 4", "n"),
        (request(prompt="é" * (most // 2 + 1)), f"prompt is {most + 2} bytes of text", "prompt"),
    ]
    for body, message, param in cases:
        with pytest.raises(InvalidRequest, match=message) as e:
            plan_completion(body, NoTokenizing(), LIMITS, policy)
        assert e.value.param == param
    fits = "a" * most  # as many bytes as the longest prompt can have: tokenised, then refused by token count
    with pytest.raises(InvalidRequest, match="tokens; the longest prompt served is"):
        plan_completion(request(prompt=fits), tokenizer, LIMITS, policy)
    saxml = SaxmlGenerateRequest(model="m", query="x" * (most + 1))
    with pytest.raises(InvalidRequest, match="query is") as e:
        plan_saxml(saxml, NoTokenizing(), LIMITS, policy)
    assert e.value.param == "query"


def test_max_tokens_limit(tokenizer):
    policy = dataclasses.replace(POLICY, max_tokens_limit=32)
    assert plan_completion(request(max_tokens=32), tokenizer, LIMITS, policy).requests[0].max_tokens == 32
    with pytest.raises(InvalidRequest, match="max_tokens=33 exceeds this server's max_tokens_limit=32") as e:
        plan_completion(request(max_tokens=33), tokenizer, LIMITS, policy)
    assert e.value.param == "max_tokens"


def saxml(query: str = "Hello world", **extra) -> SaxmlGenerateRequest:
    return SaxmlGenerateRequest(model="m", query=query, extra_inputs=extra)


def test_plan_saxml(tokenizer):
    r = plan_saxml(saxml(temperature=0.5, per_example_top_k=4), tokenizer, LIMITS, POLICY)
    assert (r.prompt_ids, r.max_tokens, r.temperature, r.top_k, r.stop_at_eos) == (
        tokenizer.encode("Hello world"), 16, 0.5, 4, True)


@pytest.mark.parametrize("query,extra,policy,param,message", [
    ("a" + " a" * 69, {}, POLICY, "query", "query has 70 tokens; the longest prompt served is 64"),
    ("Hello world", {"per_example_max_decode_steps": 127}, POLICY, "extra_inputs",
     "query (2 tokens) + extra_inputs.per_example_max_decode_steps (127) = 129 exceeds the context limit of 128 tokens"),
    ("Hello world", {"per_example_max_decode_steps": 9}, dataclasses.replace(POLICY, max_tokens_limit=8),
     "extra_inputs", "extra_inputs.per_example_max_decode_steps=9 exceeds this server's max_tokens_limit=8"),
])
def test_plan_saxml_rejections(tokenizer, query, extra, policy, param, message):
    with pytest.raises(InvalidRequest) as e:
        plan_saxml(saxml(query, **extra), tokenizer, LIMITS, policy)
    assert (e.value.message, e.value.param, e.value.status_code) == (message, param, 400)


BEAM_LIMITS = dataclasses.replace(LIMITS, max_beams=4)


def test_plan_saxml_beams(tokenizer):
    r = plan_saxml(saxml(beam_size=4, per_example_min_decode_steps=3, length_penalty=0.5,
                         per_example_max_decode_steps=8), tokenizer, BEAM_LIMITS, POLICY)
    assert (r.num_beams, r.min_tokens, r.length_penalty, r.max_tokens, r.temperature, r.stop_at_eos) == (
        4, 3, 0.5, 8, 0.0, True)


@pytest.mark.parametrize("extra,message", [
    ({"beam_size": 5}, "extra_inputs.beam_size: num_beams must be an integer in [1, 4], got 5"),
    ({"beam_size": 2, "temperature": 0.5}, "extra_inputs.temperature: temperature is not supported with beam search"),
    ({"per_example_min_decode_steps": 17}, "extra_inputs.per_example_min_decode_steps: min_tokens must be an integer "
                                           "in [0, max_tokens=16], got 17"),
])
def test_plan_saxml_beam_rejections(tokenizer, extra, message):
    with pytest.raises(InvalidRequest) as e:
        plan_saxml(saxml(**extra), tokenizer, BEAM_LIMITS, POLICY)
    assert e.value.message.startswith(message) and e.value.param == "extra_inputs"
    small = dataclasses.replace(POLICY, max_choices=2)  # max_pending_requests 2: four beams could never be admitted
    with pytest.raises(InvalidRequest, match=r"beam_size=4 exceeds the sequences this server holds at once "
                                             r"\(max_pending_requests=2\)"):
        plan_saxml(saxml(beam_size=4), tokenizer, BEAM_LIMITS, small)


def test_plan_saxml_tokenized(tokenizer):
    policy = dataclasses.replace(POLICY, saxml_tokenized=True)
    assert plan_saxml(saxml("15496, 995"), tokenizer, LIMITS, policy).prompt_ids == [15496, 995]
    for query, message in (("15496,hello", "query must be comma-separated token ids"),
                           ("1,,2", "query must be comma-separated token ids"),
                           ("50257", "token id 50257 is outside the vocabulary")):
        with pytest.raises(InvalidRequest, match=message) as e:
            plan_saxml(saxml(query), tokenizer, LIMITS, policy)
        assert e.value.param == "query"


def test_saxml_answer():
    chunks = [Chunk("r", [1, 2], [-0.5, -0.25], "ab"), Chunk("r", [3], [-1.0], "c", finish_reason="length")]
    assert saxml_answer(chunks, tokenized=False) == [("abc", -1.75)]
    assert saxml_answer(chunks, tokenized=True) == [("1,2,3", -1.75)]
    beams = [Beam([7, 8], [-0.1, -0.2], "xy", -0.15), Beam([9], [-0.4], "z", -0.4)]
    last = Chunk("r", [7, 8], [-0.1, -0.2], "xy", finish_reason="stop", score=-0.15, beams=beams)
    assert saxml_answer([last], tokenized=False) == [("xy", -0.15), ("z", -0.4)]
    assert saxml_answer([last], tokenized=True) == [("7,8", -0.15), ("9", -0.4)]
