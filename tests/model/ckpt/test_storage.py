"""model/ckpt/storage.py: local paths, URI mirrors, the format of a directory, and `tokenizer_for`,
the one answer to "which tokenizer goes with this checkpoint"."""

import json
import os

import fsspec
import numpy as np
import pytest

from model import ckpt
from model.ckpt import storage
from model.nn import transformer

TOKENS = np.array([[1, 2, 3, 4, 5]])
# A 4-token BPE: "ab" is one token (2) in this vocabulary, two tokens in GPT-2's.
VOCAB = {"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}
MERGES = "#version: 0.2\na b\n"
GPT2_HELLO_WORLD = [15496, 995]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTJ_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def memory_fs():
    fs = fsspec.filesystem("memory")
    yield fs
    fs.rm("/", recursive=True)


def test_is_uri():
    assert storage.is_uri("gs://bucket/gptj") and storage.is_uri("memory://x")
    assert not storage.is_uri("/data/gptj") and not storage.is_uri("file:///data/gptj")


def test_missing_path_is_named():
    with pytest.raises(ckpt.CheckpointError, match="'/no/such/ckpt' does not exist"):
        ckpt.load("/no/such/ckpt", progress=False)


def test_file_uri_and_files(tmp_path):
    assert storage.resolve(f"file://{tmp_path}") == str(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ckpt.CheckpointError, match="is a file; expected a checkpoint directory"):
        storage.resolve(str(tmp_path / "f"))


def test_checkpoint_format(tmp_path, hf_checkpoint):
    assert storage.checkpoint_format(hf_checkpoint.path) == "hf"
    (tmp_path / ckpt.NATIVE_MANIFEST).write_text("{}")
    assert storage.checkpoint_format(str(tmp_path)) == "native"
    with pytest.raises(ckpt.CheckpointError, match="neither a native checkpoint .* nor a Hugging Face one"):
        storage.checkpoint_format(str(tmp_path / "nothing"))


def upload(fs, local_dir, root):
    for name in os.listdir(local_dir):
        fs.pipe(f"{root}/{name}", open(os.path.join(local_dir, name), "rb").read())


def test_fsspec_uri_is_mirrored_and_loaded(cache_dir, memory_fs, hf_checkpoint):
    upload(memory_fs, hf_checkpoint.path, "/bucket/gptj")
    loaded = ckpt.load("memory://bucket/gptj", progress=False)
    ours = np.asarray(transformer.full_logits(loaded.weights, loaded.cfg, TOKENS))
    np.testing.assert_allclose(ours, hf_checkpoint.torch_logits(TOKENS), atol=1e-4)
    local = storage.resolve("memory://bucket/gptj")
    assert os.path.exists(os.path.join(local, storage.COMPLETE_MARKER))
    assert sorted(os.listdir(hf_checkpoint.path)) == sorted(set(os.listdir(local)) - {storage.COMPLETE_MARKER})


def test_empty_uri_is_named(cache_dir, memory_fs):
    with pytest.raises(ckpt.CheckpointError, match="'memory://bucket/none' does not exist or is empty"):
        storage.resolve("memory://bucket/none")


def test_unknown_protocol_is_named(cache_dir):
    with pytest.raises(ckpt.CheckpointError, match="cannot open nosuchproto://x"):
        storage.resolve("nosuchproto://x")


def test_tokenizer_for_a_preset_is_gpt2s():
    assert ckpt.tokenizer_for("tiny").encode("Hello world") == GPT2_HELLO_WORLD


def test_tokenizer_for_a_directory_uses_its_own_files(tmp_path, hf_checkpoint):
    (tmp_path / "vocab.json").write_text(json.dumps(VOCAB))
    (tmp_path / "merges.txt").write_text(MERGES)
    assert ckpt.tokenizer_for(str(tmp_path)).encode("ab") == [2]
    assert ckpt.tokenizer_for(f"file://{tmp_path}").encode("ab") == [2]
    # a checkpoint without tokenizer files gets GPT-2's (GPT-J's own)
    assert ckpt.tokenizer_for(hf_checkpoint.path).encode("Hello world") == GPT2_HELLO_WORLD


def test_tokenizer_for_a_missing_directory_is_an_error():
    with pytest.raises(ckpt.CheckpointError, match="'/no/such/ckpt' does not exist"):
        ckpt.tokenizer_for("/no/such/ckpt")


def test_tokenizer_for_a_uri_fetches_only_the_tokenizer_files(cache_dir, memory_fs):
    memory_fs.pipe("/bucket/tok/vocab.json", json.dumps(VOCAB).encode())
    memory_fs.pipe("/bucket/tok/merges.txt", MERGES.encode())
    memory_fs.pipe("/bucket/tok/model.safetensors", b"\0" * 1024)  # the weights: never fetched
    assert ckpt.tokenizer_for("memory://bucket/tok").encode("ab") == [2]
    (fetched,) = os.listdir(cache_dir)
    assert sorted(os.listdir(cache_dir / fetched)) == ["merges.txt", "vocab.json"]


def test_tokenizer_for_a_uri_without_tokenizer_files_is_gpt2s(cache_dir, memory_fs):
    memory_fs.pipe("/bucket/plain/config.json", b"{}")
    assert ckpt.tokenizer_for("memory://bucket/plain").encode("Hello world") == GPT2_HELLO_WORLD


def test_tokenizer_for_a_mirrored_uri_reads_the_mirror(cache_dir, memory_fs):
    memory_fs.pipe("/bucket/full/vocab.json", json.dumps(VOCAB).encode())
    memory_fs.pipe("/bucket/full/merges.txt", MERGES.encode())
    storage.resolve("memory://bucket/full", progress=False)
    memory_fs.rm("/bucket/full", recursive=True)  # the remote is no longer asked
    assert ckpt.tokenizer_for("memory://bucket/full").encode("ab") == [2]
