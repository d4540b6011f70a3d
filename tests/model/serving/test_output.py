"""Output processing on hand-picked token ids with the real GPT-2 tokenizer: stop tokens, stop
strings held back and cut, max_tokens, and characters split across tokens sent whole."""

import pytest

from model.serving.output import OutputStream, Result
from model.serving.request import Request
from model.text.tokenizer import Tokenizer

EOS = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.gpt2()


def feed(stream, tokens):
    outputs = []
    for t in tokens:
        outputs.append(stream.accept(t, -1.0))
        if outputs[-1].finished:
            break
    return outputs


def test_text_follows_the_tokens_and_length_ends_it(tokenizer):
    outputs = feed(OutputStream(Request([0], 3), tokenizer, EOS), [31, 32, 33, 34])
    assert [o.text for o in outputs] == ["@", "A", "B"]
    assert [o.finished for o in outputs] == [False, False, True] and outputs[-1].finish_reason == "length"


def test_a_stop_token_ends_without_being_returned_and_flushes_held_text(tokenizer):
    stream = OutputStream(Request([0], 10, stop_token_ids=[99], stop=["AB"]), tokenizer, EOS)
    # The last len("AB") - 1 characters are always held back (they could begin a stop string).
    outputs = feed(stream, [31, 32, 99])  # "@" held, then sent as "A" is held, then the stop token flushes "A"
    assert [o.text for o in outputs] == ["", "@", "A"]
    assert outputs[-1].token_ids == [] and outputs[-1].finish_reason == "stop"


def test_eos_is_a_stop_token_only_when_asked(tokenizer):
    assert not feed(OutputStream(Request([0], 5), tokenizer, EOS), [EOS])[-1].finished
    assert feed(OutputStream(Request([0], 5, stop_at_eos=True), tokenizer, EOS), [EOS])[-1].finish_reason == "stop"


def test_stop_string_is_cut_where_it_begins_even_across_tokens(tokenizer):
    stream = OutputStream(Request([0], 20, stop=["CDE", "Q"]), tokenizer, EOS)
    outputs = feed(stream, list(range(31, 45)))  # "@ABCDEFGHIJKLM"
    assert "".join(o.text for o in outputs) == "@AB"
    assert outputs[-1].finish_reason == "stop" and len(outputs) == 6  # ends on the token that completed "CDE"
    assert all("C" not in o.text for o in outputs)


def test_a_character_split_across_tokens_is_sent_whole(tokenizer):
    clef = tokenizer.encode("𝄞")  # one 4-byte character, three byte-level tokens
    assert len(clef) == 3
    pieces = [o.text for o in feed(OutputStream(Request([0], 10), tokenizer, EOS), clef)]
    assert pieces == ["", "", "𝄞"]


def test_an_incomplete_character_at_max_tokens_becomes_the_replacement_character(tokenizer):
    clef = tokenizer.encode("𝄞")
    outputs = feed(OutputStream(Request([0], 2), tokenizer, EOS), clef)
    assert "".join(o.text for o in outputs) == "\ufffd" and outputs[-1].finish_reason == "length"


def test_end_from_outside_delivers_what_was_held(tokenizer):
    stream = OutputStream(Request([0], 10, stop=["AB"]), tokenizer, EOS)
    feed(stream, [31, 32])
    last = stream.end("cancelled")
    assert last.finished and last.finish_reason == "cancelled" and last.text == "A" and last.token_ids == []


def test_result_concatenates_outputs(tokenizer):
    request = Request([5, 6], 3)
    outputs = feed(OutputStream(request, tokenizer, EOS), [31, 32, 33])
    result = Result.of(request, outputs)
    assert result.token_ids == [31, 32, 33] and result.text == "@AB" and result.logprobs == [-1.0] * 3
    assert result.prompt_ids == [5, 6] and result.finish_reason == "length"
