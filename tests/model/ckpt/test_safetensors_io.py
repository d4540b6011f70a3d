"""model/ckpt/safetensors_io.py: round trips (bfloat16 included), the streaming order check, and
malformed files refused by name; files written here are read by the `safetensors` package too."""

import ml_dtypes
import numpy as np
import pytest

from model.ckpt import safetensors_io
from model.ckpt.safetensors_io import SafetensorsError, SafetensorsFile


def tensors():
    rng = np.random.default_rng(0)
    return {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
        "c": rng.integers(-128, 127, size=(2, 2, 2)).astype(np.int8),
        "d": np.array([True, False]),
    }


def write(path, named):
    safetensors_io.write(str(path), named.items(), {k: (v.shape, v.dtype) for k, v in named.items()},
                         metadata={"format": "test"})


def test_round_trip_keeps_names_shapes_dtypes_and_bytes(tmp_path):
    named = tensors()
    write(tmp_path / "t.safetensors", named)
    st = SafetensorsFile(str(tmp_path / "t.safetensors"))
    assert st.keys() == list(named) and st.metadata == {"format": "test"}
    for k, v in named.items():
        assert st.shape(k) == v.shape and st.dtype(k) == v.dtype
        np.testing.assert_array_equal(st.get(k), v)


def test_the_safetensors_package_reads_our_files(tmp_path):
    from safetensors.numpy import load_file

    named = {k: v for k, v in tensors().items() if k != "b"}  # its numpy API has no bfloat16
    write(tmp_path / "t.safetensors", named)
    loaded = load_file(str(tmp_path / "t.safetensors"))
    for k, v in named.items():
        np.testing.assert_array_equal(loaded[k], v)


def test_tensors_out_of_declared_order_are_refused(tmp_path):
    named = tensors()
    specs = {k: (v.shape, v.dtype) for k, v in named.items()}
    with pytest.raises(SafetensorsError, match=r"tensor 'd' \(2,\) bool written where 'a' \(3, 4\) float32 was declared"):
        safetensors_io.write(str(tmp_path / "t.safetensors"), reversed(list(named.items())), specs)


def test_truncated_and_garbage_files_are_named(tmp_path):
    (tmp_path / "short").write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="too short to be a safetensors file"):
        SafetensorsFile(str(tmp_path / "short"))
    (tmp_path / "huge").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(SafetensorsError, match="header length 1000000000 exceeds the file size"):
        SafetensorsFile(str(tmp_path / "huge"))
    (tmp_path / "notjson").write_bytes((4).to_bytes(8, "little") + b"nope")
    with pytest.raises(SafetensorsError, match="header is not JSON"):
        SafetensorsFile(str(tmp_path / "notjson"))
