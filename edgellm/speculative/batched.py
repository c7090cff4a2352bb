"""Lookup speculation for one sequence among others in a batch (the scheduler's).

A draft of k tokens adds k rows to the step every running session waits for, so it pays when the tokens
the whole step yields per unit of time grow: (N + E[accepted of k]) / c(B + k) against N / c(B), with N
sequences decoding, B rows already in the step and c the batch-cost curve. That holds for a unified KV
cache. With one KV stream per sequence (the scheduler's default) llama.cpp splits a step whose sequences
carry different token counts into equal-share micro-batches, so the draft rows run as a batch of their
own: c(N) + c(D + k), with D draft rows already in the step (measured on SmolLM2, 4 sequences: one of
them with 4 drafted tokens 43.7 ms, against 21.7 ms plain and 34.0 ms in a unified cache). On a 2-core CPU, where a
batch is compute-bound, that rarely holds beside other sessions and often does for a lone one copying
text. Verification is the request's own Sampler (greedy, or rejection sampling on the chain's candidates);
learning is the same per-proposal scoring against the text that follows as in decoding/steps.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import Sampler
from edgellm.speculative.drafters import EditAwareLookup
from edgellm.speculative.policy import MARGIN, WARMUP_STEPS, Policy

# Lookups cost Python time on every step (catch up, propose, score: ~0.25 ms here), which is 4% of a
# SmolLM2 token but 1% of a 1.5B one. A sequence keeps them while the tokens they got accepted saved
# more decode time (t1 each) than that bookkeeping took; otherwise it decodes plainly for the rest of
# the reply (Lookahead.pays).

SOURCE = "edit:batched"


class Lookahead:
    count = 0

    def __init__(self, policy: Policy, engine: Engine, sampler: Sampler, prompt: Sequence[int]) -> None:
        self.policy = policy
        self.split = not engine.options.kv_unified  # draft rows cost as their own micro-batch
        self.ctx, self.sampler = engine.ctx, sampler
        self.drafter = EditAwareLookup()
        self.drafter.start(prompt)
        self.scoring: dict[int, tuple[list[int], int]] = {}  # entry -> (proposal, where it starts)
        self.expected = 0.0
        self.steps = self.accepted = 0
        self.bookkeeping_s = 0.0
        Lookahead.count += 1
        self.source = f"{SOURCE}:{Lookahead.count}"  # each sequence learns its own text's acceptance

    def close(self) -> None:
        """The sequence is done: its acceptance statistics go (a server's policy outlives many requests)."""
        self.policy.sources.pop(self.source, None)

    def draft(self, tokens: Sequence[int], room: int, rows: int, decoding: int) -> list[int]:
        """Drafted tokens to verify after the last of `tokens` (the pending one), given `rows` already in the
        step and `decoding` sequences in it; [] to decode plainly."""
        t0 = time.perf_counter()
        try:
            return self._draft(tokens, room, rows, decoding)
        finally:
            self.bookkeeping_s += time.perf_counter() - t0

    @property
    def pays(self) -> bool:
        """Whether lookups are still worth their bookkeeping for this sequence."""
        if self.policy.fixed is not None or self.steps < WARMUP_STEPS:
            return True
        return self.accepted * self.policy.curve.t1 >= self.bookkeeping_s

    def _draft(self, tokens: Sequence[int], room: int, rows: int, decoding: int) -> list[int]:
        self._score(tokens)
        room = min(room, self.policy.max_draft)
        proposal = self.drafter.propose(tokens, room) if room > 0 else []
        if not proposal:
            return []
        self.scoring[len(tokens)] = (proposal, len(tokens))
        k = self._choose(len(proposal), rows, decoding)
        self.expected = self.policy.stats(self.source).expected_accepted(k) if k else 0.0
        return proposal[:k]

    def _choose(self, available: int, rows: int, decoding: int) -> int:
        if self.policy.fixed is not None:
            return min(self.policy.fixed, available)
        s = self.policy.stats(self.source)
        plain = decoding / self._step_cost(rows, decoding, 0)
        best_k, best = 0, plain * MARGIN
        for k in range(1, available + 1):
            gain = (decoding + s.expected_accepted(k) * s.calibration) / self._step_cost(rows, decoding, k)
            if gain > best:
                best_k, best = k, gain
        return best_k

    def _step_cost(self, rows: int, decoding: int, k: int) -> float:
        """The step's time with k more draft rows; `rows` already hold `decoding` pending tokens."""
        cost = self.policy.curve.cost
        if not self.split:
            return cost(max(rows + k, 1))
        drafted = rows - decoding + k
        return cost(max(decoding, 1)) + (cost(drafted) if drafted else 0.0)

    def verify(self, row: int, draft: Sequence[int]) -> tuple[list[int], int]:
        """(accepted drafted tokens, the target's next token) from the rows of [pending, *draft]."""
        path: list[int] = []
        for i, token in enumerate(draft):
            kept, choice = self.sampler.verify(self.ctx, row + i, token)
            if not kept:
                return path, choice
            path.append(token)
        return path, self.sampler.sample(self.ctx, row + len(draft))

    def settle(self, tokens: Sequence[int], drafted: int, accepted: int) -> None:
        t0 = time.perf_counter()
        self.steps += 1
        self.accepted += min(accepted, drafted)
        if drafted and self.policy.fixed is None:
            self.policy.settle(self.source, self.expected, min(accepted, drafted))
        self.drafter.feedback(tokens, accepted)
        self._score(tokens)
        self.bookkeeping_s += time.perf_counter() - t0

    def _score(self, tokens: Sequence[int]) -> None:
        """Each proposal against the text that followed, verified or not: the policy learns while off."""
        for entry, (proposal, start) in list(self.scoring.items()):
            seen = tokens[start:start + len(proposal)]
            matched = next((i for i, (a, b) in enumerate(zip(seen, proposal, strict=False)) if a != b), len(seen))
            final = matched < len(seen) or len(seen) == len(proposal)
            self.policy.update(self.source, len(proposal), matched, entry, final)
            if final:
                del self.scoring[entry]
