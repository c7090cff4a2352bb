"""A dry run: llama.cpp sizes every buffer of a load without allocating one, and we read its log.

`no_alloc` with `LLAMA_LOAD_MODE_NONE` builds the model and a context exactly as a real load would (same
KV layout, same sliding-window split, same compute graph reserve) and prints the sizes; with mmap kept
llama.cpp aborts (`GGML_ASSERT(!ml.no_alloc)`), so the load mode is always NONE here. Takes 0.3-0.6 s.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import llama_cpp as C
from gguf import GGMLQuantizationType

from edgellm.errors import EdgeLLMError, InvalidModel
from edgellm.gguf_info import ModelInfo
from edgellm.runtime import backend

MIB = 1 << 20
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")

_KV = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB \( *(\d+) cells, +(\d+) layers, +(\d+)/(\d+) seqs\)")
_COMPUTE = re.compile(r"(\S+) compute buffer size = +([\d.]+) MiB")
_OUTPUT = re.compile(r"(\S+) +output buffer size = +([\d.]+) MiB")


@dataclass(frozen=True)
class ContextShape:
    """The context settings that decide its buffers."""

    n_ctx: int  # all slots together: each of n_seq slots gets n_ctx / n_seq positions (llama.cpp's rule)
    n_seq: int = 1
    kv_type: str = "f16"
    n_batch: int = 512
    n_outputs: int = 0  # most logits rows one batch asks for; 0 = n_batch (llama.cpp's default)
    kv_unified: bool = False
    flash_attn: bool | None = None

    def apply(self, cparams: C.llama_context_params) -> None:
        if self.kv_type not in KV_TYPES:
            raise EdgeLLMError(f"unknown KV cache type {self.kv_type!r}; use one of {', '.join(KV_TYPES)}")
        cparams.n_ctx = self.n_ctx
        cparams.n_batch = cparams.n_ubatch = min(self.n_batch, self.n_ctx)
        cparams.n_seq_max = self.n_seq
        cparams.kv_unified = self.kv_unified
        if self.n_outputs:
            cparams.n_outputs_max = max(self.n_outputs, self.n_seq)
        cparams.type_k = cparams.type_v = GGMLQuantizationType[self.kv_type.upper()].value
        if self.flash_attn is not None:
            cparams.flash_attn_type = (C.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                                       else C.LLAMA_FLASH_ATTN_TYPE_DISABLED)


@dataclass(frozen=True)
class KVCache:
    """One KV cache of a context (sliding-window models have two: full and windowed layers)."""

    cells: int
    layers: int
    nbytes: int
    windowed: bool


@dataclass(frozen=True)
class Probe:
    weights_bytes: int
    kv: tuple[KVCache, ...]
    compute_bytes: int
    output_bytes: int
    seconds: float

    @property
    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.kv)


def parse(log: str, weights_bytes: int, seconds: float) -> Probe:
    kv, windowed = [], False
    for line in log.splitlines():
        if "creating     SWA KV cache" in line or "creating SWA KV cache" in line:
            windowed = True
        m = _KV.search(line)
        if m:
            kv.append(KVCache(int(m[2]), int(m[3]), round(float(m[1]) * MIB), windowed))
            windowed = False
    compute = sum(round(float(m[2]) * MIB) for m in _COMPUTE.finditer(log))
    output = sum(round(float(m[2]) * MIB) for m in _OUTPUT.finditer(log))
    return Probe(weights_bytes, tuple(kv), compute, output, seconds)


def dry_run(info: ModelInfo, shape: ContextShape) -> Probe:
    """What loading `info` with this context would allocate, by llama.cpp's own accounting."""
    t0 = time.perf_counter()
    with backend.capture() as lines:
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.no_alloc = True
        mparams.load_mode = C.LLAMA_LOAD_MODE_NONE
        model = C.llama_model_load_from_file(str(info.path).encode(), mparams)
        if not model:
            why = backend.last_error.split(": ", 1)[-1] or "unsupported or corrupt"
            raise InvalidModel(f"llama.cpp could not read {info.path} (architecture {info.arch!r}): {why}")
        try:
            weights = int(C.llama_model_size(model))
            cparams = C.llama_context_default_params()
            shape.apply(cparams)
            cparams.n_threads = cparams.n_threads_batch = 1
            ctx = C.llama_init_from_model(model, cparams)
            if not ctx:
                raise EdgeLLMError(f"llama.cpp refused a context of {shape.n_ctx} tokens for {info.path.name}: "
                                   f"{backend.last_error or 'unknown reason'}")
            C.llama_free(ctx)
        finally:
            C.llama_model_free(model)
    return parse("".join(lines), weights, time.perf_counter() - t0)
