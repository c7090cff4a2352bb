"""How many drafted tokens to verify: the length that maximizes expected tokens per unit of time.

Every proposal a drafter makes is scored against the text that actually follows, whether it was
verified or not (the loop in decode.py does this for free). Acceptance is bursty, so two chances
are counted (recent evidence weighs more): p, that a proposal's first token is right, and a, that a
drafted token is right given the one before it was. A draft of k tokens then adds on average
p (1 - a^k) / (1 - a) tokens. Proposals still being scored count with what they have matched so far,
so a run of copying raises a at once rather than 32 tokens later.

The counts are kept per source and state; decode.py uses the state "run" when the source's last
verified draft was accepted whole (the output is copying) and "new" otherwise.

A draft of k tokens costs c(k+1) + k*d of time (c: the machine's batch-cost curve, d: the draft's
own cost per token, 0 for lookups) and yields 1 + accepted tokens; plain decoding yields 1 token per
1. The policy picks the k with the best ratio, and k = 0 (speculation off) unless some k beats plain
decoding by a margin. Because lookups keep being scored while off, speculation turns itself back on
when the text starts repeating. A draft model, whose proposals cost time, is re-tried with a short
probe now and then, and never asked at all where even a 95%-right draft could not pay.

The p/a model is optimistic where acceptance comes in bursts (an edit prompt copies long stretches,
then departs for a few tokens): it predicts long accepted runs at the wrong moments. So the drafts
that were verified settle the account: per source and state, the tokens accepted against the tokens
the model expected for them (recent steps weigh most) scale the expectation down, or back up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.speculative.costs import CostCurve

MARGIN = 1.05  # an expected gain below this is noise on these machines: decode plainly
OPTIMISTIC = 0.95  # acceptance of the best drafts, for deciding whether a costly source can ever pay
PROBE_EVERY = 32  # steps between short re-tries of a costly source that is off
DECAY = 0.995  # per scored token: older evidence fades
PRIOR = (1.0, 1.0)  # (kept, lost) a new source starts with: a = 0.5
SETTLE_DECAY = 0.85  # per verified draft: how fast the realized/expected ratio follows the text
SETTLE_PRIOR = 2.0  # expected tokens the ratio starts with (at 1.0)
WARMUP_STEPS = 16  # steps before a sequence's lookups are judged on their bookkeeping (decoding/steps.py, batched.py)
FORGIVE = 0.05  # per step spent off: share of the shortfall forgotten (the text may have changed)


@dataclass
class Counts:
    kept: float = PRIOR[0]
    lost: float = PRIOR[1]

    @property
    def rate(self) -> float:
        return self.kept / (self.kept + self.lost)

    def add(self, kept: int, lost: int) -> None:
        fade = DECAY ** (kept + lost)
        self.kept = self.kept * fade + kept
        self.lost = self.lost * fade + lost


@dataclass
class SourceStats:
    first: Counts = field(default_factory=Counts)  # p: a proposal's first token is right
    rest: Counts = field(default_factory=Counts)  # a: a token is right after a right one
    live: dict[int, int] = field(default_factory=dict)  # proposal id -> matched tokens counted so far
    draft_cost: float = 0.0  # seconds per drafted token, relative to one target token
    off_steps: int = 0
    pays: tuple[float, bool] | None = None  # could_pay's answer, for the draft_cost it was worked out for
    realized: float = SETTLE_PRIOR  # accepted tokens of verified drafts (decayed)
    expected: float = SETTLE_PRIOR  # what the model expected for those drafts (decayed)

    @property
    def calibration(self) -> float:
        return min(1.0, self.realized / self.expected)  # never more hopeful than the model itself

    @property
    def acceptance(self) -> float:
        return self.expected_accepted(16) / 16

    def expected_accepted(self, k: int) -> float:
        a = min(self.rest.rate, 0.999)
        return self.first.rate * (1 - a ** k) / (1 - a)

    def count(self, counted: int, matched: int, proposed: int, final: bool) -> None:
        if counted == 0 and (matched > 0 or final):
            self.first.add(int(matched > 0), int(matched == 0))
        if matched > 0:
            self.rest.add(matched - max(counted, 1), int(final and matched < proposed))


@dataclass
class Policy:
    curve: CostCurve
    max_draft: int = 32
    fixed: int | None = None  # verify exactly this many drafted tokens when there are (tests, benchmarks)
    sources: dict[str, SourceStats] = field(default_factory=dict)

    def stats(self, source: str) -> SourceStats:
        return self.sources.setdefault(source, SourceStats())

    def gain(self, source: str, k: int) -> float:
        s = self.stats(source)
        expected = s.expected_accepted(k) * s.calibration
        return (1 + expected) / (self.curve.cost(k + 1) + k * s.draft_cost)

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
        if self.fixed is not None:
            return min(self.fixed, available)
        k, _ = self.best(source, available)
        s = self.stats(source)
        if k == 0 and s.realized < s.expected:  # off, nothing verified: the old shortfall fades
            s.realized += FORGIVE * (s.expected - s.realized)
        if k == 0 and s.draft_cost > 0 and self.could_pay(source):
            s.off_steps += 1
            if s.off_steps >= PROBE_EVERY:  # a costly source is only scored when asked: probe it
                s.off_steps = 0
                return min(2, available)
        return k

    def update(self, source: str, proposed: int, matched: int, entry: int = -1,
               final: bool = True) -> None:
        """Proposal `entry` of `proposed` tokens is right for its first `matched` (so far, if not final)."""
        s = self.stats(source)
        s.count(s.live.pop(entry, 0), matched, proposed, final)
        if not final:
            s.live[entry] = matched

    def settle(self, source: str, expected: float, accepted: int) -> None:
        """A verified draft: the model expected `expected` accepted tokens, `accepted` were."""
        s = self.stats(source)
        s.realized = s.realized * SETTLE_DECAY + accepted
        s.expected = s.expected * SETTLE_DECAY + expected

    def could_pay(self, source: str) -> bool:
        """Whether this source beats plain decoding for some k if it were as good as drafts get.

        "As good as drafts get": p = a = 0.95, a draft model that agrees with its target on 95% of
        tokens. One costing 0.57 of the target per token cannot pay on a 2-core CPU, where verifying
        2 tokens costs 1.64: then it is never asked (no probes either), and costs nothing.
        """
        if self.fixed is not None:
            return True
        s = self.stats(source)
        if s.pays is None or s.pays[0] != s.draft_cost:  # worked out once per cost, not per token
            d = s.draft_cost
            s.pays = (d, any((1 + OPTIMISTIC * (1 - OPTIMISTIC ** k) / (1 - OPTIMISTIC))
                             / (self.curve.cost(k + 1) + k * d) > MARGIN for k in range(1, self.max_draft + 1)))
        return s.pays[1]

    def observe_draft_cost(self, source: str, seconds_per_token: float) -> None:
        s = self.stats(source)
        rel = seconds_per_token / self.curve.t1
        s.draft_cost = rel if s.draft_cost == 0 else s.draft_cost + 0.2 * (rel - s.draft_cost)
