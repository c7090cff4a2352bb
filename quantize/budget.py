"""Size budget: one quantization type per tensor, chosen from measured sensitivity, to fit a file size.

1. Error: a sample of each weight tensor's rows goes through every candidate type with llama.cpp's own
   quantizer and the importance matrix; err(type) = sum of importance x squared error, scaled to the
   whole tensor. That is the expected squared error of the tensor's matmul output.
2. Sensitivity: the F16 model reads a chunk of held-out text once per tensor, with that tensor's
   quantization error (at a probe type) added to its output through llama.cpp's eval callback; the mean
   KL divergence from the unperturbed F16 logits, divided by err(probe), is the tensor's gain.
3. Allocation: KLD(tensor, type) ~ gain x err(type), summed over tensors (small independent errors add
   up). Every tensor starts at its cheapest type; the upgrade that removes the most KLD per byte is
   taken while the budget allows (each tensor's options reduced to their lower convex hull first).
"""

from __future__ import annotations

import ctypes
import heapq
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as C
import numpy as np
from gguf import GGMLQuantizationType as T

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import ModelInfo, read_info
from edgellm.quantize.ggml_quant import round_trip, row_bytes
from edgellm.quantize.imatrix import GGML_OP_MUL_MAT, GGMLTensor, ImportanceMatrix
from edgellm.quantize.report import HELDOUT, log_softmax
from edgellm.runtime.engine import Engine, LoadOptions

GGML_OP_GET_ROWS = 40  # enum ggml_op in the vendored ggml.h
# candidates by row length: K-quants and IQ4_XS need rows of 256, the others rows of 32
CANDIDATES_256 = (T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
CANDIDATES_32 = (T.Q4_0, T.IQ4_NL, T.Q5_0, T.Q5_1, T.Q8_0)
PROBE_BITS = 3.5  # the sensitivity probe uses the candidate nearest this many bits per weight
SAMPLE_ROWS = 256  # rows per tensor whose error is measured per type
# the file type named in the GGUF for the type that holds the most weights
FILE_TYPE = {T.Q2_K: "Q2_K", T.Q3_K: "Q3_K_M", T.IQ4_XS: "IQ4_XS", T.Q4_K: "Q4_K_M", T.Q5_K: "Q5_K_M",
             T.Q6_K: "Q6_K", T.Q8_0: "Q8_0", T.Q4_0: "Q4_0", T.IQ4_NL: "IQ4_NL", T.Q5_0: "Q5_0", T.Q5_1: "Q5_1"}


@dataclass(frozen=True)
class Option:
    qtype: T
    n_bytes: int
    kld: float  # predicted contribution to the mean KL divergence


@dataclass
class Plan:
    types: dict[str, T]  # tensor name -> type
    tensor_bytes: int  # bytes of the planned tensors
    fixed_bytes: int  # everything else in the file (metadata, vocabulary, norms)
    predicted_kld: float

    @property
    def file_bytes(self) -> int:
        return self.tensor_bytes + self.fixed_bytes

    def file_type(self) -> str:
        weight: dict[T, int] = {}
        for qtype in self.types.values():
            weight[qtype] = weight.get(qtype, 0) + 1
        return FILE_TYPE[max(weight, key=weight.__getitem__)]

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for qtype in self.types.values():
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        mix = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        return f"{mix} (predicted mean KLD {self.predicted_kld:.4f})"

    def overrides(self) -> dict[str, str]:
        """Exact-name patterns for llama_model_quantize's tensor overrides."""
        return {f"^{re.escape(name)}$": qtype.name for name, qtype in self.types.items()}


def parse_size(text: str) -> int:
    """'300MB', '0.3GB', '300MiB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise EdgeLLMError(f"cannot read size {text!r}; write it like 300MB or 1.2GB")
    scale = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m[2]]
    return int(float(m[1]) * (1024 if m[3] else 1000) ** scale)


def candidates(n_per_row: int) -> tuple[T, ...]:
    return CANDIDATES_256 if n_per_row % 256 == 0 else CANDIDATES_32 if n_per_row % 32 == 0 else ()


def weights(info: ModelInfo) -> dict[str, np.ndarray]:
    """The F16/F32 matrices llama.cpp would quantize, memory-mapped (rows x n_per_row)."""
    out = {}
    for t in info.tensors:
        if len(t.shape) != 2 or t.type not in (T.F16, T.F32) or not candidates(t.shape[0]):
            continue
        dtype = np.float16 if t.type == T.F16 else np.float32
        out[t.name] = np.memmap(info.path, dtype=dtype, mode="r", offset=info.data_offset + t.offset,
                                shape=(t.shape[1], t.shape[0]))
    return out


def quantization_errors(w: np.ndarray, importance: np.ndarray | None) -> dict[T, float]:
    """Importance-weighted squared error of each candidate type, for the whole tensor (from a row sample)."""
    n_rows, n = w.shape
    pick = np.linspace(0, n_rows - 1, min(n_rows, SAMPLE_ROWS)).astype(int)
    rows = np.asarray(w[pick], dtype=np.float32)
    scale = np.ones(n, np.float32) if importance is None else importance
    errs = {}
    for qtype in candidates(n):
        diff = round_trip(rows, qtype, importance) - rows
        errs[qtype] = float((np.square(diff, dtype=np.float64) @ scale).sum() * n_rows / len(pick))
    return errs


def probe_type(types: tuple[T, ...], n: int) -> T:
    return min(types, key=lambda t: abs(8 * row_bytes(t, n) / n - PROBE_BITS))


def measure_gains(f16: Path, mats: dict[str, np.ndarray], importance: dict[str, np.ndarray],
                  errors: dict[str, dict[T, float]], n_tokens: int = 128, threads: int | None = None,
                  progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """KLD per unit of error for each tensor: one perturbed pass over held-out text per tensor."""
    target: dict[str, object] = {"name": None, "delta": None}

    @C.ggml_backend_sched_eval_callback
    def perturb(t_ptr: int, ask: bool, _user: object) -> bool:
        t = ctypes.cast(t_ptr, ctypes.POINTER(GGMLTensor)).contents
        if t.op not in (GGML_OP_MUL_MAT, GGML_OP_GET_ROWS) or t.src[0].contents.name.decode() != target["name"]:
            return not ask
        if ask:
            return True
        src1, delta = t.src[1].contents, target["delta"]
        rows = src1.ne[1] * src1.ne[2] * src1.ne[3]
        out = np.ctypeslib.as_array(ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float)), shape=(rows, t.ne[0]))
        if t.op == GGML_OP_GET_ROWS:  # an embedding lookup: the looked-up rows carry the error
            ids = np.ctypeslib.as_array(ctypes.cast(src1.data, ctypes.POINTER(ctypes.c_int32)), shape=(rows,))
            out += delta[ids]
        else:  # a matmul: y = W x, so the error adds (dW) x
            x = np.ctypeslib.as_array(ctypes.cast(src1.data, ctypes.POINTER(ctypes.c_float)),
                                      shape=(rows, src1.ne[0]))
            out += x @ delta.T
        return True

    options = LoadOptions(n_ctx=n_tokens, n_batch=n_tokens, n_threads=threads, eval_callback=perturb)
    with Engine(f16, options) as engine:
        tokens = engine.tokenize(HELDOUT.read_text(encoding="utf-8"), add_special=False)
        bos = C.llama_vocab_bos(engine.vocab)
        chunk = tokens[-n_tokens:]  # the report scores the start of the text; this end is not scored there
        if engine.add_bos and bos >= 0:
            chunk = [bos, *chunk[1:]]

        def logprobs() -> np.ndarray:
            engine.reset()
            engine.decode(chunk, all_logits=True)
            logits = np.ctypeslib.as_array(C.llama_get_logits(engine.ctx), shape=(len(chunk), engine.n_vocab))
            return log_softmax(logits, np.float32)  # float32: this runs once per matrix

        base = logprobs()
        p_base = np.exp(base)
        gains = {}
        for i, (name, w) in enumerate(mats.items()):
            probe = probe_type(tuple(errors[name]), w.shape[1])
            full = np.asarray(w, dtype=np.float32)
            target["name"], target["delta"] = name, round_trip(full, probe, importance.get(name)) - full
            kld = float((p_base * (base - logprobs())).sum() / len(chunk))
            gains[name] = max(kld, 0.0) / max(errors[name][probe], 1e-30)
            if progress:
                progress(i + 1, len(mats))
        target["name"] = target["delta"] = None
    return gains


def allocate(options: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """Cheapest option everywhere, then the upgrades with the most KLD removed per byte while they fit."""
    hulls = {name: _lower_hull(opts) for name, opts in options.items()}
    chosen = {name: 0 for name in hulls}
    left = budget - sum(h[0].n_bytes for h in hulls.values())
    if left < 0:
        raise EdgeLLMError(f"a budget of {budget / 1e6:,.1f} MB for the weights is below the smallest mix "
                           f"({(budget - left) / 1e6:,.1f} MB); ask for more")
    heap = []

    def push(name: str) -> None:
        i, hull = chosen[name], hulls[name]
        if i + 1 < len(hull):
            gain = hull[i].kld - hull[i + 1].kld
            cost = hull[i + 1].n_bytes - hull[i].n_bytes
            heapq.heappush(heap, (-gain / cost, name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        i, hull = chosen[name], hulls[name]
        cost = hull[i + 1].n_bytes - hull[i].n_bytes
        if cost <= left:  # too dear: this tensor stays where it is (a cheaper upgrade elsewhere may still fit)
            left -= cost
            chosen[name] = i + 1
            push(name)
    return {name: hulls[name][i] for name, i in chosen.items()}


def _lower_hull(opts: list[Option]) -> list[Option]:
    """Options worth having: more bytes must buy less KLD, at a falling rate."""
    hull: list[Option] = []
    for o in sorted(opts, key=lambda o: (o.n_bytes, o.kld)):
        if hull and o.kld >= hull[-1].kld:
            continue
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], o):
            hull.pop()
        hull.append(o)
    return hull


def _slope(a: Option, b: Option) -> float:
    return (b.kld - a.kld) / (b.n_bytes - a.n_bytes)  # negative; steeper = better


def fixed_bytes(info: ModelInfo, mats: dict[str, np.ndarray]) -> int:
    """The file's bytes that no plan changes: metadata, vocabulary, norms, whatever is not in `mats`."""
    return info.size_bytes - sum(t.n_bytes for t in info.tensors if t.name in mats)


def target_bytes(info: ModelInfo, size_bytes: int | None, bpw: float | None) -> int:
    """The budget in bytes; a one-line error when even the cheapest candidate types do not fit it."""
    if size_bytes is None:
        if bpw is None:
            raise ValueError("give a size or bits per weight")
        size_bytes = int(bpw * info.n_params / 8)
    mats = weights(info)
    smallest = fixed_bytes(info, mats) + sum(
        w.shape[0] * min(row_bytes(q, w.shape[1]) for q in candidates(w.shape[1])) for w in mats.values())
    if size_bytes < smallest:
        raise EdgeLLMError(f"a budget of {size_bytes / 1e6:,.1f} MB is below the smallest mix for this model "
                           f"({smallest / 1e6:,.1f} MB); ask for more")
    return size_bytes


def plan(f16: Path, imatrix: ImportanceMatrix | None, size_bytes: int | None = None, bpw: float | None = None,
         threads: int | None = None, progress: Callable[[int, int], None] | None = None) -> Plan:
    """Types per tensor for the F16 GGUF `f16` so that the quantized file fits `size_bytes` (or `bpw`)."""
    info = read_info(f16)
    mats = weights(info)
    if not mats:
        raise EdgeLLMError(f"{f16.name} has no F16/F32 matrices to quantize")
    size_bytes = target_bytes(info, size_bytes, bpw)
    fixed = fixed_bytes(info, mats)
    importance = imatrix.means() if imatrix is not None else {}
    errors = {name: quantization_errors(w, importance.get(name)) for name, w in mats.items()}
    gains = measure_gains(f16, mats, importance, errors, threads=threads, progress=progress)
    options = {name: [Option(q, w.shape[0] * row_bytes(q, w.shape[1]), gains[name] * e)
                      for q, e in errors[name].items()] for name, w in mats.items()}
    picked = allocate(options, size_bytes - fixed)
    return Plan({n: o.qtype for n, o in picked.items()}, sum(o.n_bytes for o in picked.values()), fixed,
                sum(o.kld for o in picked.values()))
