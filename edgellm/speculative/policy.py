"""How many drafted tokens to verify: the length that maximizes expected tokens per unit of time.

Every proposal a drafter makes is scored against the text that actually follows, whether it was
verified or not (the loop in decode.py does this for free). The policy keeps the recent scores per
draft source and state, and estimates the tokens a draft of length k would add as the average of
min(matched, k) over them: no assumption about the shape of acceptance, which for lookups is bursty
(right for dozens of tokens while the output copies code, wrong at the next edit).

A draft of k tokens costs c(k+1) + k*d of time (c: the machine's batch-cost curve, d: the draft's
own cost per token, 0 for lookups) and yields 1 + accepted tokens. Plain decoding yields 1 token per
1. The policy picks the k with the best ratio, and k = 0 (speculation off) unless some k beats plain
decoding by a margin. Because lookups keep being scored while off, speculation turns itself back on
when the text starts repeating; a draft model, whose proposals cost time, is re-tried now and then.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .costs import CostCurve

MARGIN = 1.03  # an expected gain below this is noise on these machines: decode plainly
PROBE_EVERY = 32  # steps between short re-tries of a costly source that is off
HISTORY = 24  # scored proposals kept per source and state
PRIOR = ((16, 1), (16, 0))  # (proposed, matched) pseudo-scores a new source starts with


@dataclass
class SourceStats:
    scores: deque[tuple[int, int]] = field(default_factory=lambda: deque(PRIOR, maxlen=HISTORY))
    # proposals still being scored: matched so far (a lower bound), so a run of copying counts now,
    # not 32 tokens later when its first proposal is settled
    live: dict[int, tuple[int, int]] = field(default_factory=dict)
    draft_cost: float = 0.0  # seconds per drafted token, relative to one target token
    off_steps: int = 0

    def expected_accepted(self, k: int) -> float:
        total = sum(min(matched, k) for _, matched in self.scores)
        total += sum(min(matched, k) for _, matched in self.live.values())
        return total / (len(self.scores) + len(self.live))

    @property
    def acceptance(self) -> float:
        proposed = sum(p for p, _ in self.scores)
        return sum(m for _, m in self.scores) / proposed if proposed else 0.0


@dataclass
class Policy:
    curve: CostCurve
    max_draft: int = 32
    sources: dict[str, SourceStats] = field(default_factory=dict)

    def stats(self, source: str) -> SourceStats:
        return self.sources.setdefault(source, SourceStats())

    def gain(self, source: str, k: int) -> float:
        s = self.stats(source)
        return (1 + s.expected_accepted(k)) / (self.curve.cost(k + 1) + k * s.draft_cost)

    def best(self, source: str, available: int) -> tuple[int, float]:
        best_k, best = 0, MARGIN
        for k in range(1, min(available, self.max_draft) + 1):
            g = self.gain(source, k)
            if g > best:
                best_k, best = k, g
        return best_k, best

    def choose(self, source: str, available: int) -> int:
        """Draft length to verify now (0: decode plainly)."""
        if available <= 0:
            return 0
        k, _ = self.best(source, available)
        s = self.stats(source)
        if k == 0 and s.draft_cost > 0:
            s.off_steps += 1
            if s.off_steps >= PROBE_EVERY:  # a costly source is only scored when asked: probe it
                s.off_steps = 0
                return min(2, available)
        return k

    def update(self, source: str, proposed: int, matched: int, entry: int | None = None,
               final: bool = True) -> None:
        """A proposal of `proposed` tokens turned out right for its first `matched` (so far, if not final)."""
        if proposed <= 0:
            return
        s = self.stats(source)
        if entry is not None:
            s.live.pop(entry, None)
            if not final:
                s.live[entry] = (proposed, matched)
                return
        s.scores.append((proposed, matched))

    def observe_draft_cost(self, source: str, seconds_per_token: float) -> None:
        s = self.stats(source)
        rel = seconds_per_token / self.curve.t1
        s.draft_cost = rel if s.draft_cost == 0 else s.draft_cost + 0.2 * (rel - s.draft_cost)
