"""GGUF -> low-bit GGUF with llama.cpp's own quantizer (`llama_model_quantize` via llama-cpp-python)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import llama_cpp as C

from edgellm import llama_runtime
from edgellm.errors import EdgeLLMError

# types llama-quantize refuses to make without an importance matrix
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}
CONVERT_ONLY = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}  # the converter writes these


def file_type(name: str) -> gguf.LlamaFileType:
    key = name.upper()
    for candidate in (f"MOSTLY_{key}", key):
        if candidate in gguf.LlamaFileType.__members__:
            return gguf.LlamaFileType[candidate]
    names = sorted(m.removeprefix("MOSTLY_") for m in gguf.LlamaFileType.__members__ if m != "GUESSED")
    raise EdgeLLMError(f"unknown quantization type {name!r}; known: {', '.join(names)}")


def check_type(qtype: str, with_imatrix: bool = False) -> gguf.LlamaFileType:
    """The file type for a name, or a one-line error (unknown, or needs an importance matrix)."""
    ftype = file_type(qtype)
    if qtype.upper() in NEEDS_IMATRIX and not with_imatrix:
        raise EdgeLLMError(f"{qtype.upper()} needs an importance matrix; drop --no-imatrix or pass --imatrix FILE")
    return ftype


def draft_layers_to_drop(n_layer: int, keep: float) -> list[int]:
    """Layers to prune for a self-draft: evenly spread over the middle; the first and last two stay."""
    n_drop = max(0, min(n_layer - 4, round(n_layer * (1 - keep))))
    middle = list(range(2, n_layer - 2))
    if n_drop == 0:
        return []
    step = len(middle) / n_drop
    return sorted({middle[int(i * step)] for i in range(n_drop)})


def quantize(src: Path, out: Path, qtype: str, threads: int | None = None, imatrix=None,
             prune: list[int] | None = None) -> Path:
    """Quantize `src` into `out` (written under a temporary name, renamed at the end).

    `imatrix`: an imatrix.ImportanceMatrix, used for the types that take one. `prune`: layer indices to
    drop (llama.cpp's layer pruning; the self-draft of speculative decoding).
    """
    from .imatrix import as_quantize_param

    ftype = check_type(qtype, imatrix is not None)
    llama_runtime.init()
    params = C.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = threads or os.cpu_count() or 1
    if imatrix is not None:
        entries, _keep = as_quantize_param(imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(C.llama_model_imatrix_data))
    if prune:
        layers = (ctypes.c_int32 * (len(prune) + 1))(*prune, -1)  # -1 ends the list
        params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
    tmp = out.with_name(f".{out.name}.partial")
    try:
        rc = C.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            why = llama_runtime.last_error or f"code {rc}"
            raise EdgeLLMError(f"llama.cpp could not quantize {src.name} to {qtype.upper()}: {why}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
