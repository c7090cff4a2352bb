"""Importance matrix: the mean squared activation entering each weight matrix, from calibration text.

Computed in-process like llama-imatrix: llama.cpp's eval callback shows us every matrix multiplication
of the graph; for those whose weight is a `blk.*` tensor (and whose batch has 16+ rows of F32
activations) the squares of the activations are summed per input column. Saved in the GGUF format
llama-quantize reads (`<name>.in_sum2`, `<name>.counts`, `imatrix.*` keys) and handed to
`llama_model_quantize` as per-column means.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import gguf
import llama_cpp as C
import numpy as np

from edgellm.errors import EdgeLLMError
from edgellm.runtime.engine import Engine, LoadOptions

CALIBRATION = resources.files("edgellm.assets").joinpath("calibration.txt")  # package data: works from a wheel
GGML_OP_MUL_MAT = 29  # enum ggml_op in the vendored ggml.h
GGML_TYPE_F32 = 0


class GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml.h), as far as the callback reads it."""


GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GGMLTensor) * 10),
    ("view_src", ctypes.POINTER(GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


@dataclass
class ImportanceMatrix:
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # weight name -> sum of x^2 per column
    counts: dict[str, int] = field(default_factory=dict)  # weight name -> rows of activations seen
    chunks: int = 0
    chunk_size: int = 0
    dataset: str = ""

    def means(self) -> dict[str, np.ndarray]:
        return {name: (s / max(1, self.counts[name])).astype(np.float32) for name, s in self.sums.items()}

    def save(self, path: Path) -> Path:
        """Written under a temporary name and renamed: a killed run never leaves half a matrix."""
        tmp = path.with_name(f".{path.name}.partial")
        writer = gguf.GGUFWriter(tmp, arch="imatrix")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", [self.dataset])
        writer.add_uint32("imatrix.chunk_count", self.chunks)
        writer.add_uint32("imatrix.chunk_size", self.chunk_size)
        for name in sorted(self.sums):
            writer.add_tensor(f"{name}.in_sum2", self.sums[name].astype(np.float32).reshape(1, -1))
            writer.add_tensor(f"{name}.counts", np.array([[self.counts[name]]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> ImportanceMatrix:
        reader = gguf.GGUFReader(path)
        out = cls()
        for t in reader.tensors:
            if t.name.endswith(".in_sum2"):
                out.sums[t.name.removesuffix(".in_sum2")] = np.array(t.data, dtype=np.float64).reshape(-1)
            elif t.name.endswith(".counts"):
                out.counts[t.name.removesuffix(".counts")] = int(np.array(t.data).reshape(-1)[0])
        return out


def compute(model: Path, text: str | None = None, n_ctx: int = 512, max_chunks: int | None = None,
            threads: int | None = None, dataset: str = "assets/calibration.txt", n_batch: int = 128) -> ImportanceMatrix:
    """`n_batch`: tokens per decode. Every token needs its logits row (vocabulary x 4 bytes: 0.6 MB on
    Qwen), and llama.cpp sizes its output and compute buffers by the batch, so 128 instead of the chunk's
    512 saves about 0.5 GB on a 150k vocabulary; the KV cache carries the chunk's context across batches."""
    text = text if text is not None else CALIBRATION.read_text(encoding="utf-8")
    im = ImportanceMatrix(chunk_size=n_ctx, dataset=dataset)

    @C.ggml_backend_sched_eval_callback
    def collect(t_ptr: int, ask: bool, _user: object) -> bool:
        t = ctypes.cast(t_ptr, ctypes.POINTER(GGMLTensor)).contents
        if t.op != GGML_OP_MUL_MAT:
            return not ask  # not interested; in the data phase, True means "go on computing"
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = src0.name.decode("utf-8", "replace")
        if ask:  # the scheduler asks which results we want to see; llama-imatrix's filter
            return src1.ne[1] >= 16 and src1.type == GGML_TYPE_F32 and name.startswith("blk.")
        ne0, rows = src1.ne[0], src1.ne[1] * src1.ne[2] * src1.ne[3]
        x = np.ctypeslib.as_array(ctypes.cast(src1.data, ctypes.POINTER(ctypes.c_float)), shape=(rows * ne0,))
        if src1.nb[1] != ne0 * 4:  # rows with padding: step over it
            x = np.lib.stride_tricks.as_strided(x, shape=(rows, ne0), strides=(src1.nb[1], 4))
        sq = np.square(x.reshape(rows, ne0), dtype=np.float64).sum(axis=0)
        if name in im.sums:
            im.sums[name] += sq
        else:
            im.sums[name] = sq
        im.counts[name] = im.counts.get(name, 0) + rows
        return True

    options = LoadOptions(n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=threads, eval_callback=collect)
    with Engine(model, options) as engine:
        tokens = engine.tokenize(text, add_special=False)
        if len(tokens) < n_ctx:
            raise EdgeLLMError(f"the calibration text ({dataset}) is {len(tokens)} tokens; the importance matrix "
                               f"needs at least {n_ctx} (one chunk): give a longer --calibration file")
        bos = C.llama_vocab_bos(engine.vocab)
        for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
            if max_chunks is not None and im.chunks >= max_chunks:
                break
            chunk = tokens[start:start + n_ctx]
            if engine.add_bos and bos >= 0:
                chunk = [bos, *chunk[1:]]  # like llama-imatrix: each chunk starts as a document
            engine.reset()
            # logits for every token, as llama-imatrix asks: otherwise llama.cpp keeps only the last row in
            # the last layer, and its matrices (under 16 rows) would get no statistics
            engine.decode(chunk, all_logits=True)
            im.chunks += 1
    if not im.sums:
        raise EdgeLLMError(f"the calibration text ({dataset}) gave no activations (needs at least {n_ctx} tokens)")
    return im


def as_quantize_param(im: ImportanceMatrix) -> tuple[ctypes.Array, list]:
    """The NULL-terminated llama_model_imatrix_data array, and the buffers it points into (keep them alive)."""
    keep: list = []
    entries = (C.llama_model_imatrix_data * (len(im.sums) + 1))()
    for i, (name, mean) in enumerate(sorted(im.means().items())):
        buf = np.ascontiguousarray(mean, dtype=np.float32)
        raw = name.encode()
        keep += [buf, raw]
        entries[i].name = raw
        entries[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = buf.size
    return entries, keep
