"""The memory plan: how many bytes a load takes, where each goes, and the settings that make it fit.

Figures come from llama.cpp's own dry run (probe.py) when the library is there, else from the GGUF header
alone (`estimate`, for `edgellm models` and warnings before a download). Peak host RSS is

    process base + fixed overhead + weights on the CPU + KV on the CPU + output + compute buffer

where the fixed overhead is llama.cpp's vocabulary and graph structures (measured: 160 bytes per token
and merge plus 5 MiB; README "Memory"). The compute buffer is reserved for `n_outputs` logits rows, so
the plan sets `n_outputs` to what the decoding needs: 1 per slot, 33 with speculation.
Budgets are `MemAvailable` minus a margin (llama.cpp's --fit uses total RAM on Linux), or `--ram/--vram`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import ModelInfo, read_info
from edgellm.runtime.probe import KV_TYPES, ContextShape, KVCache, Probe, dry_run

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_CTX = 4096
KV_LADDER = ("f16", "q8_0", "q4_0")  # tried in this order when the user did not name a type
MIN_AUTO_CTX = 1024  # the plan shrinks an unrequested context down to this, no further
SPECULATIVE_OUTPUTS = 33  # a verification batch: up to 32 drafted tokens and the pending one
TREE_SEQUENCES = 4  # token trees: sequence 0 and a branch each for up to three continuations
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def fmt(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def parse_size(text: str) -> int:
    """'8G', '512M', '1.5GiB', '2000000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not m:
        raise EdgeLLMError(f"cannot read {text!r} as a size; write it like 8G, 512M or 1.5GiB")
    return int(float(m[1]) * (1 << (10 * " kmgt".index(m[2] or " "))))


def mem_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def margin(available: int) -> int:
    """What stays free for the rest of the machine: 10% of what is available, at least 256 MiB, at most 1 GiB."""
    return min(max(available // 10, 256 * MIB), GIB)


def default_ram_budget() -> int:
    avail = mem_available()
    return avail - margin(avail)


def gpu_free_bytes() -> int:
    """Free memory of the first GPU (0 without GPU offload support or a driver tool to ask)."""
    from edgellm.runtime import backend

    if not backend.supports_gpu_offload() or not shutil.which("nvidia-smi"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) * MIB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def process_base() -> int:
    """This process's resident memory now: a load adds to it."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def fixed_overhead(info: ModelInfo) -> int:
    """llama.cpp's vocabulary maps, merges and graph structures: not in any buffer it reports."""
    merges = info.metadata.get("tokenizer.ggml.merges")
    return 5 * MIB + 160 * (info.vocab_size + (len(merges) if merges is not None else 0))


def layer_weights(info: ModelInfo) -> tuple[list[int], int, int]:
    """(bytes per repeating layer, input embedding bytes, other bytes: output head and norms)."""
    per_layer = [0] * info.n_layer
    embd = other = 0
    for t in info.tensors:
        m = _BLOCK.match(t.name)
        if m and int(m[1]) < info.n_layer:
            per_layer[int(m[1])] += t.n_bytes
        elif t.name.startswith("token_embd"):
            embd += t.n_bytes
        else:
            other += t.n_bytes
    return per_layer, embd, other


def estimate(info: ModelInfo, shape: ContextShape) -> Probe:
    """The dry run's figures from the header alone (no llama.cpp): weights exact, KV from the attention
    shape, compute from a fit to the dry runs of the dev models (within ~10%)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[shape.kv_type.upper()]]
    k_len, v_len = info.head_dim
    n_kv = info.n_head_kv * (k_len + v_len)
    kv = info.n_layer * shape.n_ctx * n_kv * size // block
    n_ubatch = min(shape.n_batch, shape.n_ctx)
    n_ff = int(info.arch_value("feed_forward_length", 4 * info.n_embd) or 0)
    outputs = shape.n_outputs or n_ubatch
    compute = n_ubatch * 4 * (3 * n_ff + 4 * info.n_embd) + shape.n_ctx * 1024 + outputs * info.vocab_size * 4
    output = max(outputs, shape.n_seq) * info.vocab_size * 4
    return Probe(sum(t.n_bytes for t in info.tensors), (KVCache(shape.n_ctx, info.n_layer, kv, False),),
                 compute, output, 0.0)


@dataclass(frozen=True)
class PlanRequest:
    n_ctx: int | None = None  # per slot; None: the model's training context, at most DEFAULT_CTX
    parallel: int = 1  # sequence slots (sessions decoded together)
    kv_type: str | None = None  # None: f16, quantized when f16 does not fit
    draft: str | None = None  # a draft model's path, or None
    speculative: bool = False  # lookup drafts need the wider verification batch even without a model
    tree: bool = False  # token trees: a branch per sequence in one unified cache, all rows with logits
    n_gpu_layers: int | None = None  # None: as many as fit
    ram: int | None = None  # bytes for this load; None: MemAvailable minus a margin
    vram: int | None = None  # None: the GPU's free memory, 0 without one
    n_batch: int = 512
    dry_run: bool = True  # False: the header estimate only
    # llama.cpp RPC workers (HOST:PORT): layers go there as to a GPU, after what fits locally (local first)
    rpc: tuple[str, ...] = ()


@dataclass
class Side:
    """One model's share of a plan."""

    info: ModelInfo
    probe: Probe
    n_gpu_layers: int = 0
    vram_bytes: int = 0
    weights_vram: int = 0
    kv_vram: int = 0

    @property
    def host_bytes(self) -> int:
        p = self.probe
        return (fixed_overhead(self.info) + p.weights_bytes - self.weights_vram + p.kv_bytes - self.kv_vram
                + p.output_bytes + (0 if self.n_gpu_layers > self.info.n_layer else p.compute_bytes))


@dataclass
class Plan:
    target: Side
    draft: Side | None
    n_ctx: int  # per slot
    parallel: int
    kv_type: str
    n_outputs: int
    base_bytes: int
    tree: bool
    ram_budget: int
    vram_budget: int
    source: str  # "dry run" or "estimate"
    notes: list[str] = field(default_factory=list)
    offload_to: str = "the GPU"  # where offloaded layers go: the GPU, or the RPC workers
    workers: list[tuple[str, int]] = field(default_factory=list)  # (endpoint, free bytes) of each RPC worker

    def worker_shares(self) -> list[dict]:
        """Each worker's part of what is offloaded: llama.cpp splits the layers among RPC devices in proportion
        to their free memory (its default tensor_split)."""
        total = sum(free for _, free in self.workers) or 1
        n, used = self.target.n_gpu_layers, self.target.vram_bytes
        return [{"endpoint": e, "free_bytes": free, "layers": round(n * free / total),
                 "bytes": round(used * free / total)} for e, free in self.workers]
    draft_reason: str = ""  # why a draft model is or is not in the plan (options.choose_draft)

    @property
    def peak_bytes(self) -> int:
        return self.base_bytes + self.target.host_bytes + (self.draft.host_bytes if self.draft else 0)

    @property
    def vram_bytes(self) -> int:
        return self.target.vram_bytes + (self.draft.vram_bytes if self.draft else 0)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.ram_budget and self.vram_bytes <= self.vram_budget

    def _sum(self, name: str) -> int:
        sides = [self.target, *([self.draft] if self.draft else [])]
        return sum(getattr(s.probe, name) for s in sides)

    def load_options(self, **extra):
        from edgellm.runtime.engine import LoadOptions

        # token trees: one unified cache of n_ctx, a sequence per branch, every row with logits
        n_ctx, n_seq, outputs = ((self.n_ctx, TREE_SEQUENCES, 0) if self.tree
                                 else (self.n_ctx * self.parallel, self.parallel, self.n_outputs))
        return LoadOptions(n_ctx=n_ctx, n_batch=extra.pop("n_batch", 512), n_gpu_layers=self.target.n_gpu_layers,
                           type_k=self.kv_type, type_v=self.kv_type, n_seq_max=n_seq, kv_unified=self.tree,
                           n_outputs=outputs, **extra)

    def as_dict(self) -> dict:
        t = self.target
        return {
            "model": str(t.info.path), "source": self.source, "fits": self.fits,
            "peak_bytes": self.peak_bytes, "vram_bytes": self.vram_bytes,
            "weights_bytes": self._sum("weights_bytes"), "kv_bytes": self._sum("kv_bytes"),
            "compute_bytes": self._sum("compute_bytes"), "output_bytes": self._sum("output_bytes"),
            "overhead_bytes": self.base_bytes + fixed_overhead(t.info)
            + (fixed_overhead(self.draft.info) if self.draft else 0),
            "n_gpu_layers": t.n_gpu_layers, "n_ctx": self.n_ctx, "parallel": self.parallel,
            "kv_type": self.kv_type, "n_outputs": self.n_outputs,
            "draft": str(self.draft.info.path) if self.draft else None,
            "draft_n_gpu_layers": self.draft.n_gpu_layers if self.draft else 0,
            "ram_budget": self.ram_budget, "vram_budget": self.vram_budget,
            "kv_caches": [{"cells": c.cells, "layers": c.layers, "bytes": c.nbytes, "windowed": c.windowed}
                          for c in t.probe.kv],
            "draft_reason": self.draft_reason, "notes": self.notes, "offload_to": self.offload_to,
            "workers": self.worker_shares(),
        }

    def describe(self) -> str:
        t = self.target
        p = t.probe
        lines = [f"{t.info.name} ({t.info.file_type}), {self.n_ctx} tokens x {self.parallel} slot(s), "
                 f"KV {self.kv_type}; figures from the {self.source}"]
        rows = [("weights", p.weights_bytes - t.weights_vram, t.weights_vram)]
        for c in p.kv:
            what = "KV (sliding window)" if c.windowed else "KV"
            share = round(t.kv_vram * c.nbytes / p.kv_bytes) if p.kv_bytes else 0
            slots = f" x {self.parallel} slots" if self.parallel > 1 else ""
            rows.append((f"{what}: {c.layers} layers x {c.cells} cells{slots}", c.nbytes - share, share))
        gpu_compute = t.n_gpu_layers > t.info.n_layer
        rows += [("compute buffer", 0 if gpu_compute else p.compute_bytes, p.compute_bytes if t.n_gpu_layers else 0),
                 ("output buffer", p.output_bytes, 0),
                 ("vocabulary and graph", fixed_overhead(t.info), 0)]
        if self.draft:
            d = self.draft
            rows.append((f"draft {d.info.name}", d.host_bytes, d.vram_bytes))
        rows.append(("this process", self.base_bytes, 0))
        remote = self.offload_to != "the GPU"
        where = "workers" if remote else "GPU"
        for name, host, vram in rows:
            lines.append(f"  {name:<38} {fmt(host):>10}" + (f"  {where} {fmt(vram):>10}" if vram else ""))
        lines.append(f"  {'peak host memory':<38} {fmt(self.peak_bytes):>10}  of {fmt(self.ram_budget)} budget")
        if self.vram_budget:
            lines.append(f"  {'workers' + chr(39) + ' memory' if remote else 'GPU memory':<38} {fmt(self.vram_bytes):>10}"
                         f"  of {fmt(self.vram_budget)} free; {t.n_gpu_layers} of {t.info.n_layer + 1} layers on "
                         f"{self.offload_to}")
            if len(self.workers) > 1:
                for w in self.worker_shares():
                    lines.append(f"    {w['endpoint']:<36} {fmt(w['bytes']):>10}  about {w['layers']} layers "
                                 f"({fmt(w['free_bytes'])} free)")
        lines += [f"  - {n}" for n in ([self.draft_reason] if self.draft_reason else []) + self.notes]
        return "\n".join(lines)


def _offload(side: Side, vram_left: int, wanted: int | None) -> int:
    """Put the last layers (llama.cpp offloads from the top) and then the output head on the GPU while they
    fit after the GPU's compute buffer; return the VRAM left."""
    info, p = side.info, side.probe
    per_layer, _, other = layer_weights(info)
    kv_per_layer = p.kv_bytes / max(1, info.n_layer)
    limit = info.n_layer + 1 if wanted is None else min(wanted, info.n_layer + 1)
    if limit <= 0 or vram_left < p.compute_bytes:
        return vram_left
    used, n, weights, kv = p.compute_bytes, 0, 0, 0.0
    for i in reversed(range(info.n_layer)):
        if n >= limit or used + per_layer[i] + kv_per_layer > vram_left:
            break
        used += per_layer[i] + kv_per_layer
        weights += per_layer[i]
        kv += kv_per_layer
        n += 1
    if n == info.n_layer and n < limit and used + other <= vram_left:
        used += other
        weights += other
        n += 1
    if n == 0:
        return vram_left
    side.n_gpu_layers, side.vram_bytes, side.weights_vram, side.kv_vram = n, int(used), weights, int(kv)
    return vram_left - int(used)


def _attempt(info: ModelInfo, draft: ModelInfo | None, req: PlanRequest, n_ctx: int, parallel: int,
             kv_type: str, ram: int, vram: int, base: int, source: str,
             probe: Callable[[ModelInfo, ContextShape], Probe]) -> Plan:
    n_outputs = SPECULATIVE_OUTPUTS if (req.speculative or draft) else 1
    if req.tree:
        shape = ContextShape(n_ctx=n_ctx, n_seq=TREE_SEQUENCES, kv_type=kv_type, n_batch=req.n_batch, kv_unified=True)
    else:
        shape = ContextShape(n_ctx=n_ctx * parallel, n_seq=parallel, kv_type=kv_type, n_batch=req.n_batch,
                             n_outputs=max(n_outputs, parallel))
    target = Side(info, probe(info, shape))
    side_draft = None
    vram_left = vram
    if draft is not None:  # the draft runs every step: it goes on the GPU first (it stays here, not on workers)
        draft_shape = ContextShape(n_ctx=n_ctx, n_batch=req.n_batch, n_outputs=1)  # it drafts for one session
        side_draft = Side(draft, probe(draft, draft_shape))
        if not req.rpc:
            vram_left = _offload(side_draft, vram_left, None)
    plan = Plan(target, side_draft, n_ctx, parallel, kv_type, shape.n_outputs, base, req.tree, ram, vram, source)
    if req.rpc:
        plan.offload_to = "the workers " + ", ".join(req.rpc)
    if vram_left <= 0:
        return plan
    if not (req.rpc and req.n_gpu_layers is None):
        _offload(target, vram_left, req.n_gpu_layers)
        return plan
    # workers are further away than this machine's memory: the fewest layers there that let the rest fit here
    for n in range(info.n_layer + 2):
        target.n_gpu_layers = target.vram_bytes = target.weights_vram = target.kv_vram = 0
        _offload(target, vram_left, n)
        if plan.fits or target.n_gpu_layers < n:  # it fits, or the workers hold no more
            break
    return plan


def make_plan(model: ModelInfo | str | Path, req: PlanRequest | None = None) -> Plan:
    """The first settings that fit, trying in order: the draft left out, a quantized KV cache (unless the
    user named one), fewer slots, a shorter context (unless the user named one). A request that fits in
    none of them raises EdgeLLMError with the numbers, before anything is loaded."""
    req = req or PlanRequest()
    info = model if isinstance(model, ModelInfo) else read_info(model)
    draft = read_info(req.draft) if req.draft else None
    if req.kv_type is not None and req.kv_type not in KV_TYPES:
        raise EdgeLLMError(f"unknown KV cache type {req.kv_type!r}; use one of {', '.join(KV_TYPES)}")
    if req.parallel < 1:
        raise EdgeLLMError("--parallel must be at least 1")
    train = info.n_ctx_train or DEFAULT_CTX
    n_ctx = req.n_ctx or min(train, DEFAULT_CTX)
    if n_ctx > train:
        raise EdgeLLMError(f"context {n_ctx} is larger than the model's training context ({train}); "
                           f"use --ctx {train} or less")
    ram = req.ram if req.ram is not None else default_ram_budget()
    vram = req.vram if req.vram is not None else gpu_free_bytes()
    workers: list[tuple[str, int]] = []
    if req.rpc and req.vram is None:  # each worker's free memory, read before anything is loaded
        from edgellm.runtime.rpc import free_memory, parse_endpoints

        workers = [(str(e), free_memory([e])) for e in parse_endpoints(",".join(req.rpc))]
        vram = sum(free for _, free in workers)
    base = process_base()
    source = "dry run" if req.dry_run else "estimate"
    kv_types = [req.kv_type] if req.kv_type else list(KV_LADDER)
    contexts = [n_ctx]
    while req.n_ctx is None and contexts[-1] // 2 >= MIN_AUTO_CTX:
        contexts.append(contexts[-1] // 2)

    probes: dict[tuple[Path, ContextShape], Probe] = {}  # the ladder meets the same shapes again

    def probe(model_info: ModelInfo, shape: ContextShape) -> Probe:
        key = (model_info.path, shape)
        if key not in probes:
            probes[key] = dry_run(model_info, shape) if req.dry_run else estimate(model_info, shape)
        return probes[key]

    def attempt(d: ModelInfo | None, c: int, p: int, k: str) -> Plan:
        plan = _attempt(info, d, req, c, p, k, ram, vram, base, source, probe)
        plan.workers = workers
        return plan

    first = attempt(draft, n_ctx, req.parallel, kv_types[0])
    if first.fits:
        return first
    notes: list[str] = []
    if draft is not None:
        without = attempt(None, n_ctx, req.parallel, kv_types[0])
        notes.append(f"draft {draft.name} left out: it needs {fmt(first.peak_bytes - without.peak_bytes)} "
                     "more than the budget has")
        if without.fits:
            without.notes = notes
            return without
    for parallel in sorted({req.parallel, *(p for p in (4, 2, 1) if p < req.parallel)}, reverse=True):
        for c in contexts:
            for k in kv_types:
                plan = attempt(None, c, parallel, k)
                if plan.fits:
                    if k != kv_types[0]:
                        notes.append(f"KV cache {k}: f16 does not fit")
                    if parallel != req.parallel:
                        notes.append(f"{parallel} slot(s) instead of {req.parallel}: more do not fit")
                    if c != n_ctx:
                        notes.append(f"context {c} instead of {n_ctx}: a longer one does not fit")
                    plan.notes = notes
                    return plan
    smallest = attempt(None, contexts[-1], 1, kv_types[-1])
    where = "free on the workers" if req.rpc else "GPU memory"
    gpu = f" and {fmt(smallest.vram_bytes)} of {fmt(vram)} {where}" if vram else ""
    raise EdgeLLMError(f"{info.name} does not fit: it needs {fmt(first.peak_bytes)} of memory "
                       f"(at least {fmt(smallest.peak_bytes)} with {contexts[-1]} tokens, KV {kv_types[-1]}){gpu}, "
                       f"and {fmt(ram)} is available for it")
