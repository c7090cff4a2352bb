"""The machine's batch-cost curve: how long the target takes to decode n tokens (all with logits).

On a 2-core CPU a batch is compute-bound (4 tokens cost 2.3x one token), on a GPU nearly free; the
curve decides how long a draft can pay. `measure` times every size once per model, build and thread
count (cached in ~/.cache/edgellm/costs/); the first use of a model does not wait for that: it starts
from a prior (`prior`), refines it from the timings of real verification batches, and keeps the
refined curve for the next run.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from edgellm import buildflags

# Every size a verification can have (the pending token + up to 32 drafted): the curve is not smooth.
# Matmul kernels work in tiles of rows, so 8 tokens can cost 1.6x what 7 do and 16 less than 12 (AMD
# EPYC, AVX2, Qwen2.5-Coder-1.5B); interpolating between coarse sizes hides that.
SIZES = tuple(range(1, 34))
DEPTH = 256  # context depth at which the curve is measured


# The prior is pessimistic on purpose, so it never turns speculation on where the measured curve would
# not: a token costs 3 ms plus reading every weight at 45 GB/s (SmolLM2 6.3 ms, the 1.5B 27 ms on the
# AVX-512 EPYC), and a batch of n costs n up to 4 tokens, then half a token more per token (measured
# there: c(2)=1.95, c(4)=3.06, c(8)=5.49, c(16)=5.97, c(33)=11.3; on the AVX2 EPYC c(2)=1.35-1.64).
PRIOR_FIXED_S = 0.003
PRIOR_BYTES_PER_S = 45e9
KEEP_AFTER = 16  # verification batches observed before a refined prior is worth keeping


@dataclass
class CostCurve:
    seconds: dict[int, float]  # batch size -> seconds for one decode of that many tokens
    prior: bool = False  # from the model's size, not measured
    observed: int = 0  # real batches folded in

    @property
    def t1(self) -> float:
        return self.seconds[1]

    def cost(self, n: int) -> float:
        """Time of an n-token batch relative to one token, interpolated between measured sizes."""
        sizes = sorted(self.seconds)
        if n in self.seconds:
            return self.seconds[n] / self.t1
        lo = max((s for s in sizes if s < n), default=sizes[0])
        hi = min((s for s in sizes if s > n), default=None)
        if hi is None:  # beyond the largest: grow in proportion
            return self.seconds[lo] / self.t1 * n / lo
        f = (n - lo) / (hi - lo)
        return ((1 - f) * self.seconds[lo] + f * self.seconds[hi]) / self.t1

    def observe(self, n: int, seconds: float, weight: float = 0.1) -> None:
        """Fold in the time of a real batch (moving average) while the curve is a prior. A measured (or
        refined and stored) curve stays as it is: decisions that followed a few noisy timings swung whole
        replies (the same prompt sped up 1.07x, then 2.9x), so the choice is the text's, not the clock's."""
        if not self.prior:
            return
        if n in self.seconds:
            # a prior knows nothing: the first real timings replace it faster
            w = max(weight, 0.5) if self.prior and self.observed < KEEP_AFTER else weight
            self.seconds[n] += w * (seconds - self.seconds[n])
            self.observed += 1


def prior(engine) -> CostCurve:
    return prior_for(engine.info)


def prior_for(info) -> CostCurve:
    t1 = PRIOR_FIXED_S + info.size_bytes / PRIOR_BYTES_PER_S
    return CostCurve({n: t1 * (n if n <= 4 else 4 + 0.5 * (n - 4)) for n in SIZES}, prior=True)


def _cache_path(engine) -> Path:
    return _cache_path_for(engine.path, engine.n_threads, engine.options.n_gpu_layers)


def _cache_path_for(path: Path, n_threads: int, n_gpu_layers: int) -> Path:
    st = path.stat()
    key = "|".join([str(path.resolve()), str(st.st_size), str(int(st.st_mtime)), str(SIZES),
                    str(n_threads), str(n_gpu_layers),
                    buildflags.cache_key(buildflags.cmake_args(buildflags.cpu_flags(), False))])
    return buildflags.cache_dir() / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def curve_for(info, n_threads: int, n_gpu_layers: int = 0) -> CostCurve:
    """The model's cached curve for these settings (measured, or a prior refined by real batches), else
    its prior: for deciding before anything is loaded."""
    try:
        data = json.loads(_cache_path_for(info.path, n_threads, n_gpu_layers).read_text())
        return CostCurve({int(k): float(v) for k, v in data["seconds"].items()}, prior=bool(data.get("refined_prior")))
    except (OSError, ValueError, KeyError):
        return prior_for(info)


def measure(engine, sizes: tuple[int, ...] = SIZES, repetitions: int = 2) -> CostCurve:
    """Time decodes of each size at DEPTH tokens of context (best of `repetitions`); leaves the KV empty."""
    rng = random.Random(0)
    depth = min(DEPTH, engine.n_ctx - max(sizes) - 1)
    engine.reset()
    engine.decode([rng.randrange(engine.n_vocab) for _ in range(depth)])
    engine.decode([rng.randrange(engine.n_vocab)], all_logits=True)  # warm-up
    engine.truncate(depth)
    best: dict[int, float] = {}
    for _ in range(repetitions):
        for n in sizes:
            batch = [rng.randrange(engine.n_vocab) for _ in range(n)]
            t0 = time.perf_counter()
            engine.decode(batch, all_logits=True)
            dt = time.perf_counter() - t0
            engine.truncate(depth)
            best[n] = min(best.get(n, dt), dt)
    engine.reset()
    return CostCurve(best)


def _load(engine) -> CostCurve | None:
    try:
        data = json.loads(_cache_path(engine).read_text())
        return CostCurve({int(k): float(v) for k, v in data["seconds"].items()})
    except (OSError, ValueError, KeyError):
        return None


def save(engine, curve: CostCurve) -> None:
    path = _cache_path(engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": str(engine.path), "threads": engine.n_threads,
                               "seconds": curve.seconds, "refined_prior": curve.prior}))
    tmp.replace(path)


def load_or_measure(engine) -> CostCurve:
    curve = _load(engine)
    if curve is None:
        curve = measure(engine)
        save(engine, curve)
    return curve


def load_or_prior(engine) -> CostCurve:
    """The cached curve, else the prior at once (no measuring before the first reply)."""
    return _load(engine) or prior(engine)


def keep_refined(engine, curve: CostCurve) -> None:
    """Store a prior that real batches have refined, for the next run."""
    if curve.prior and curve.observed >= KEEP_AFTER:
        save(engine, curve)
