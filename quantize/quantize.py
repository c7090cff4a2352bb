"""GGUF -> low-bit GGUF with llama.cpp's own quantizer (`llama_model_quantize` via llama-cpp-python)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import llama_cpp as C

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import read_info
from edgellm.runtime import backend

# types llama-quantize refuses to make without an importance matrix
NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}
SLAB_BYTES = 64 << 20
CONVERT_ONLY = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}  # the converter writes these


def file_type(name: str) -> gguf.LlamaFileType:
    key = name.upper()
    for candidate in (f"MOSTLY_{key}", key):
        if candidate in gguf.LlamaFileType.__members__:
            return gguf.LlamaFileType[candidate]
    names = sorted(m.removeprefix("MOSTLY_") for m in gguf.LlamaFileType.__members__ if m != "GUESSED")
    raise EdgeLLMError(f"unknown quantization type {name!r}; known: {', '.join(names)}")


def tensor_type(name: str) -> int:
    """A ggml tensor type by name (Q6_K, IQ4_NL, F16…), or a one-line error."""
    try:
        return int(gguf.GGMLQuantizationType[name.upper()])
    except KeyError:
        known = ", ".join(t.name for t in gguf.GGMLQuantizationType)
        raise EdgeLLMError(f"unknown tensor type {name!r}; known: {known}") from None


def check_fits(src: Path, wanted: dict[str, str]) -> None:
    """llama.cpp has no fallback for --output-type/--embedding-type: a type whose blocks do not divide
    the rows fails deep inside it, so say so first. `wanted`: tensor name -> type."""
    for t in read_info(src).tensors:
        qtype = wanted.get(t.name)
        if qtype is None:
            continue
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type(qtype))][0]
        if t.shape[0] % block:
            raise EdgeLLMError(f"{qtype.upper()} packs rows in blocks of {block}, but {t.name} has rows of "
                               f"{t.shape[0]}; pick a type with blocks of 32 (Q8_0, Q5_0, Q4_0, IQ4_NL)")


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
             prune: list[int] | None = None, tensor_types: dict[str, str] | None = None,
             output_type: str | None = None, embedding_type: str | None = None) -> Path:
    """Quantize `src` into `out` (written under a temporary name, renamed at the end).

    `imatrix`: an imatrix.ImportanceMatrix, used for the types that take one. `prune`: layer indices to
    drop (llama.cpp's layer pruning; the self-draft of speculative decoding). `tensor_types`: regex of
    tensor names -> type, first match wins (llama-quantize's --tensor-type); `output_type` and
    `embedding_type`: types for output.weight and token_embd.weight.
    """
    from edgellm.quantize.imatrix import as_quantize_param

    ftype = check_type(qtype, imatrix is not None)
    backend.init()
    params = C.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = threads or os.cpu_count() or 1
    # rows in flight at once: by default a whole tensor is widened to F32 (Qwen's 151,936 x 896 embedding:
    # 545 MB); in slabs the peak stays near the input mapping, and the output is byte for byte the same
    params.max_buf_size = SLAB_BYTES
    if imatrix is not None:
        entries, _keep = as_quantize_param(imatrix)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(C.llama_model_imatrix_data))
    keep = []
    if tensor_types:
        table = (C.llama_model_tensor_override * (len(tensor_types) + 1))()  # a NULL pattern ends it
        for row, (pattern, name) in zip(table, tensor_types.items(), strict=False):  # the table has one more
            raw = pattern.encode()
            keep.append(raw)
            row.pattern, row.type = raw, tensor_type(name)
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(C.llama_model_tensor_override))
        keep.append(table)
    wanted = {name: t for name, t in (("output.weight", output_type), ("token_embd.weight", embedding_type)) if t}
    if wanted:
        check_fits(src, wanted)
    if output_type:
        params.output_tensor_type = tensor_type(output_type)
    if embedding_type:
        params.token_embedding_type = tensor_type(embedding_type)
    if prune:
        layers = (ctypes.c_int32 * (len(prune) + 1))(*prune, -1)  # -1 ends the list
        params.prune_layers = ctypes.cast(layers, ctypes.POINTER(ctypes.c_int32))
    tmp = out.with_name(f".{out.name}.partial")
    try:
        rc = C.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            why = backend.last_error or f"code {rc}"
            raise EdgeLLMError(f"llama.cpp could not quantize {src.name} to {qtype.upper()}: {why}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
