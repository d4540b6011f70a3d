"""Weights on disk: Hugging Face GPT-J directories, the native JAX-layout format, presets and
gs:// URIs, and which tokenizer goes with a checkpoint.

    hf.py       the HF <-> native mapping (declared once) and reading HF directories
    native.py   the native format: leaf names, write, restore into shardings
    storage.py  local paths, URI mirrors, the format of a directory, `tokenizer_for`
    loading.py  `load`: a checkpoint of any kind onto a mesh
    safetensors_io.py  the safetensors reader/writer (memory maps, bfloat16)
    errors.py   CheckpointError

Importable without JAX (the CPU ingress uses it): no module here imports JAX at import time; the
functions that put weights on devices, or need the model's leaf declarations, import it."""

from model.ckpt.errors import CheckpointError
from model.ckpt.hf import native_to_hf
from model.ckpt.loading import Loaded, load
from model.ckpt.native import NATIVE_MANIFEST, NATIVE_WEIGHTS, leaf_names, unflatten_like
from model.ckpt.storage import checkpoint_format, is_uri, resolve, tokenizer_for
from model.nn.config import PRESETS

__all__ = [
    "CheckpointError", "Loaded", "NATIVE_MANIFEST", "NATIVE_WEIGHTS", "PRESETS", "checkpoint_format", "is_uri",
    "leaf_names", "load", "native_to_hf", "resolve", "tokenizer_for", "unflatten_like",
]
