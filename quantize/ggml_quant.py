"""llama.cpp's own quantizers on numpy rows: quantize with ggml_quantize_chunk, read back with to_float.

The size budget uses these to measure what each type does to each tensor before anything is written;
they are the same C functions `llama_model_quantize` calls, so the error measured is the error shipped.
"""

from __future__ import annotations

import ctypes

import numpy as np
from gguf import GGMLQuantizationType as T
from llama_cpp._ggml import libggml

_to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", _to_float), ("from_float_ref", ctypes.c_void_p)]


libggml.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_float)]
libggml.ggml_quantize_chunk.restype = ctypes.c_size_t
libggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
libggml.ggml_row_size.restype = ctypes.c_size_t
libggml.ggml_get_type_traits.argtypes = [ctypes.c_int]
libggml.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)


def row_bytes(qtype: T, n_per_row: int) -> int:
    return int(libggml.ggml_row_size(int(qtype), n_per_row))


def round_trip(rows: np.ndarray, qtype: T, importance: np.ndarray | None = None) -> np.ndarray:
    """`rows` (float32, rows x n) quantized to `qtype` and back to float32."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n_rows, n = rows.shape
    packed = np.empty(n_rows * row_bytes(qtype, n), dtype=np.uint8)
    weights = None
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        weights = importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    libggml.ggml_quantize_chunk(int(qtype), rows.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                packed.ctypes.data, 0, n_rows, n, weights)
    out = np.empty_like(rows)
    libggml.ggml_get_type_traits(int(qtype)).contents.to_float(
        packed.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows.size)
    return out
