"""Greedy texts from two decoding paths agree, or part at a near-tie of the logits (checked on the logits)."""

from __future__ import annotations

import numpy as np

from edgellm.runtime.engine import Engine

# logits: a batched decode and a single-token decode may differ by this much (Q4 weights, other kernels)
NEAR_TIE = 0.5


def assert_same_or_near_tie(engine: Engine, prompt: list[int], plain: list[int], other: list[int]) -> None:
    """Identical, or the first difference is where plain decoding's top two logits nearly tie and the other
    path took the runner-up. `engine` holds one sequence; it is reset."""
    assert plain and other, "an empty reply proves nothing"
    diverge = next((i for i, (a, b) in enumerate(zip(plain, other, strict=False)) if a != b), None)
    if diverge is None:
        assert len(plain) == len(other), (len(plain), len(other))
        return
    engine.reset()
    engine.prefill(prompt + plain[:diverge])
    logits = engine.logits(-1)
    first, second = np.argsort(logits)[::-1][:2]
    assert other[diverge] == second, f"token {diverge}: the other path did not pick plain decoding's runner-up"
    assert logits[first] - logits[second] < NEAR_TIE, f"diverged at token {diverge} without a near-tie"
