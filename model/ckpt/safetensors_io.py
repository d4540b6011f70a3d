"""A small safetensors reader and writer over numpy memory maps, with bfloat16 via ml_dtypes.

Why not the `safetensors` package's numpy API: it cannot represent bfloat16, and GPT-J checkpoints
are bf16 or fp16. The format is simple (8-byte little-endian header size, a JSON header of
name -> dtype / shape / byte offsets, then raw little-endian data), and a memory map lets a loader
read only the slice of a tensor that one device needs.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsError(ValueError):
    """A safetensors file is malformed or holds a dtype this reader does not know."""


class SafetensorsFile:
    """Lazy access to the tensors of one .safetensors file; `get(name)` is a read-only memory map."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise SafetensorsError(f"{path}: too short to be a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > os.path.getsize(path):
                raise SafetensorsError(f"{path}: header length {header_len} exceeds the file size")
            try:
                header = json.loads(f.read(header_len))
            except json.JSONDecodeError as e:
                raise SafetensorsError(f"{path}: header is not JSON ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._data_start = 8 + header_len
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if header else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entries[name]["dtype"]
        if code not in DTYPES:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


def write(path: str, tensors: Iterable[tuple[str, np.ndarray]], specs: dict[str, tuple[tuple[int, ...], np.dtype]],
          metadata: dict[str, str] | None = None) -> None:
    """Stream tensors into one safetensors file. `specs` (name -> shape, dtype, in file order) fixes
    the header up front, so tensors can be produced one at a time and never all held in memory."""
    header: dict = {"__metadata__": metadata or {}}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, array in _in_order(tensors, specs):
            f.write(np.ascontiguousarray(array).tobytes())


def _in_order(tensors, specs) -> Iterator[tuple[str, np.ndarray]]:
    expected = iter(specs.items())
    for name, array in tensors:
        want_name, (shape, dtype) = next(expected)
        if name != want_name or tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            raise SafetensorsError(
                f"tensor {name!r} {array.shape} {array.dtype} written where {want_name!r} {shape} {np.dtype(dtype)} was declared"
            )
        yield name, array
