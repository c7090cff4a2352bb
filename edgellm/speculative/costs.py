"""The machine's batch-cost curve: how long the target takes to decode n tokens (all with logits).

On a 2-core CPU a batch is compute-bound (4 tokens cost 2.3x one token), on a GPU nearly free; the
curve decides how long a draft can pay. It is measured once per model, build and thread count, cached
in ~/.cache/edgellm/costs/, and refined online from the timings of real verification batches.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from .. import buildflags

# Every size a verification can have (the pending token + up to 32 drafted): the curve is not smooth.
# Matmul kernels work in tiles of rows, so 8 tokens can cost 1.6x what 7 do and 16 less than 12 (AMD
# EPYC, AVX2, Qwen2.5-Coder-1.5B); interpolating between coarse sizes hides that.
SIZES = tuple(range(1, 34))
DEPTH = 256  # context depth at which the curve is measured


@dataclass
class CostCurve:
    seconds: dict[int, float]  # batch size -> seconds for one decode of that many tokens

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
        """Fold in the time of a real batch (moving average), so the curve follows the machine."""
        if n in self.seconds:
            self.seconds[n] += weight * (seconds - self.seconds[n])


def _cache_path(engine) -> Path:
    st = engine.path.stat()
    key = "|".join([str(engine.path.resolve()), str(st.st_size), str(int(st.st_mtime)), str(SIZES),
                    str(engine.n_threads), str(engine.options.n_gpu_layers),
                    buildflags.cache_key(buildflags.cmake_args(buildflags.cpu_flags(), False))])
    return buildflags.cache_dir() / "costs" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


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


def load_or_measure(engine) -> CostCurve:
    path = _cache_path(engine)
    try:
        data = json.loads(path.read_text())
        return CostCurve({int(k): float(v) for k, v in data["seconds"].items()})
    except (OSError, ValueError, KeyError):
        pass
    curve = measure(engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"model": str(engine.path), "threads": engine.n_threads,
                               "seconds": curve.seconds}))
    tmp.replace(path)
    return curve
