"""Where a checkpoint lives: a local directory, or an fsspec URI mirrored into a local cache; which
format a directory holds; and which tokenizer goes with a checkpoint.

A URI (`gs://bucket/dir`, through gcsfs; any fsspec protocol but `file://`) is mirrored once, whole,
into `GPTJ_CACHE_DIR` (default ~/.cache/gptj-serve), one directory per URI named by a hash of it;
a `.complete` marker is written last, so an interrupted download is redone. `tokenizer_for` fetches
only a URI's small tokenizer files into that same directory, so a CPU process that needs just the
tokenizer (the ingress) never downloads the weights.

No JAX here: the CPU ingress imports this module.
"""

from __future__ import annotations

import hashlib
import os
import sys

from model.ckpt.errors import CheckpointError
from model.ckpt.native import NATIVE_MANIFEST
from model.nn.config import PRESETS
from model.text.tokenizer import Tokenizer

COMPLETE_MARKER = ".complete"
# The files `Tokenizer.for_checkpoint` reads from a checkpoint directory.
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def is_uri(path: str) -> bool:
    """A remote fsspec location (`file://` paths are local)."""
    return "://" in path and not path.startswith("file://")


def resolve(path: str, progress: bool = True) -> str:
    """A local directory for `path`: itself, or a cached mirror of a remote fsspec URI."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not is_uri(path):
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {path!r} does not exist (and is not a preset: {sorted(PRESETS)})")
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {path!r} is a file; expected a checkpoint directory")
        return path
    return _mirror(path, progress)


def checkpoint_format(path: str) -> str:
    """'native' or 'hf' for a local checkpoint directory."""
    if os.path.exists(os.path.join(path, NATIVE_MANIFEST)):
        return "native"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise CheckpointError(f"{path}: neither a native checkpoint ({NATIVE_MANIFEST}) nor a Hugging Face one (config.json)")


def tokenizer_for(checkpoint: str) -> Tokenizer:
    """The tokenizer that goes with `checkpoint` (the one answer for the CLI, the ingress and the
    replica): GPT-2's for a preset; for a directory, its own `tokenizer.json` or `vocab.json` +
    `merges.txt`, else GPT-2's (`Tokenizer.for_checkpoint`); for a URI, the same rule over its
    tokenizer files, fetched alone into the cache (or read from the full mirror when there is one).
    A local path that does not exist is a CheckpointError, as in `resolve`."""
    if checkpoint in PRESETS:
        return Tokenizer.gpt2()
    if is_uri(checkpoint):
        return Tokenizer.for_checkpoint(_fetch_tokenizer_files(checkpoint))
    return Tokenizer.for_checkpoint(resolve(checkpoint))


def _cache_dir(uri: str) -> str:
    cache_root = os.environ.get("GPTJ_CACHE_DIR", os.path.expanduser("~/.cache/gptj-serve"))
    return os.path.join(cache_root, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16])


def _open_fs(uri: str):
    """(filesystem, root path) for a URI; an unknown protocol or a missing fsspec backend is named."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"cannot open {uri}: {e}") from None


def _copy(fs, src: str, dest: str, on_chunk=None) -> None:
    """Copy one remote file to `dest`, through `dest.part`, so `dest` is never half written."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with fs.open(src, "rb") as source, open(dest + ".part", "wb") as out:
        while chunk := source.read(64 << 20):
            out.write(chunk)
            if on_chunk:
                on_chunk(len(chunk))
    os.replace(dest + ".part", dest)


def _mirror(uri: str, progress: bool) -> str:
    local = _cache_dir(uri)
    done_marker = os.path.join(local, COMPLETE_MARKER)
    if os.path.exists(done_marker):
        return local
    fs, root = _open_fs(uri)
    try:
        files = [f for f in fs.find(root) if not f.endswith("/")]
    except (ImportError, ValueError) as e:
        raise CheckpointError(f"cannot open {uri}: {e}") from None
    if not files:
        raise CheckpointError(f"checkpoint {uri!r} does not exist or is empty")
    os.makedirs(local, exist_ok=True)
    total = sum(fs.size(f) for f in files)
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {uri}", disable=not progress, file=sys.stderr) as bar:
        for f in files:
            _copy(fs, f, os.path.join(local, os.path.relpath(f, root.rstrip("/"))), bar.update)
    open(done_marker, "w").close()
    return local


def _fetch_tokenizer_files(uri: str) -> str:
    """The cache directory of `uri`, holding whichever of its TOKENIZER_FILES exist (the weights
    are not fetched); the full mirror as it is once complete."""
    local = _cache_dir(uri)
    if os.path.exists(os.path.join(local, COMPLETE_MARKER)):
        return local
    fs, root = _open_fs(uri)
    for name in TOKENIZER_FILES:
        src = f"{root.rstrip('/')}/{name}"
        if fs.exists(src):
            _copy(fs, src, os.path.join(local, name))
    return local
