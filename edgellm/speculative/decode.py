"""Speculative generation: drafters propose, the target verifies the whole draft in one batch.

Greedy: a drafted token is kept while it equals the target's argmax at its position. Sampling: a
drafted token d is kept with probability p(d) (the drafts are deterministic, so q(d) = 1), else the
target samples from p with d removed; either way the output follows the target's distribution
exactly. Rejected tokens leave the KV cache (llama_memory_seq_rm) before the next step, so the cache
always holds exactly the accepted text.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from edgellm.errors import EdgeLLMError
from edgellm.runtime.engine import Engine, Record, Stats, finish_after
from edgellm.runtime.sampling import SamplingParams, probabilities
from edgellm.speculative import tree
from edgellm.speculative.drafters import Drafter
from edgellm.speculative.policy import Policy
from edgellm.textstream import TextStream

TREE_BRANCH = 4  # tokens in each alternative branch of a token tree


class _Picker:
    """The target's choice at one output row, greedy or by rejection sampling against a draft token.

    `history` is the text before the row (context, then the draft up to it): the repeat penalty reads it.
    """

    def __init__(self, engine: Engine, sampling: SamplingParams) -> None:
        self.engine, self.sampling = engine, sampling
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(32)
        self.rng = np.random.default_rng(seed)

    def _logits(self, row: int, history: Sequence[int]) -> np.ndarray:
        logits = self.engine.logits(row)
        s = self.sampling
        return logits if s.repeat_penalty == 1.0 else penalize(logits, history[-s.repeat_last_n:], s.repeat_penalty)

    def pick(self, row: int, history: Sequence[int] = ()) -> int:
        logits = self._logits(row, history)
        if self.sampling.greedy:
            return int(logits.argmax())
        p = probabilities(logits, self.sampling)
        return int(self.rng.choice(p.shape[0], p=p))

    def verify(self, row: int, draft: int, history: Sequence[int] = ()) -> tuple[bool, int]:
        """(kept, token): keep the drafted token, or the token the target puts in its place."""
        logits = self._logits(row, history)
        if self.sampling.greedy:
            best = int(logits.argmax())
            return best == draft, best
        p = probabilities(logits, self.sampling)
        if self.rng.random() < p[draft]:
            return True, draft
        p[draft] = 0.0
        total = p.sum()
        if total <= 0:  # p was a point mass on the draft; cannot happen after a rejection
            return True, draft
        return False, int(self.rng.choice(p.shape[0], p=p / total))


def penalize(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty (llama_sampler_init_penalties, no frequency or presence term): every
    token seen in the window has its logit divided by the penalty when positive, multiplied when not."""
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    if ids.size:
        v = out[ids]
        out[ids] = np.where(v <= 0, v * np.float32(penalty), v / np.float32(penalty))
    return out


def generate(engine: Engine, prompt: Sequence[int], drafter: Drafter, policy: Policy,
             sampling: SamplingParams, max_tokens: int, stop: Sequence[str] = (),
             cancel: threading.Event | None = None, ignore_eog: bool = False,
             tree_width: int = 1) -> Iterator[Record]:
    """Stream records like Engine.generate; `tree_width` > 1 verifies token trees (greedy only)."""
    prompt = list(prompt)
    if sampling.repeat_penalty != 1.0 and tree_width > 1:
        raise EdgeLLMError("--draft tree does not support --repeat-penalty; use --draft edit or auto")
    stats = Stats(prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    stats.prefilled_tokens = engine.prefill(prompt)
    stats.prefill_s = time.perf_counter() - t0
    drafter.start(prompt)
    parts: Sequence[Drafter] = getattr(drafter, "parts", (drafter,))
    picker = _Picker(engine, sampling)
    text = TextStream(stop)
    tokens = list(prompt)  # the context: the KV cache holds all of it (the pending token is not in it)
    last_n = sampling.repeat_last_n if sampling.repeat_penalty != 1.0 else 0  # the penalty's window
    pending = picker.pick(-1, tokens[-last_n:] if last_n else ())
    t_first = time.perf_counter()
    in_run: dict[str, bool] = {}  # per source: was its last draft accepted whole?
    # Each source's latest proposal is scored against the text that follows, verified or not, as if
    # all of it had been verified: the policy learns for free, also while it keeps a source off.
    scoring: dict[int, tuple[str, list[int], int]] = {}  # id -> (stats key, proposal, where it starts)

    def score() -> None:
        for entry, (key, proposal, start) in list(scoring.items()):
            seen = tokens[start:start + len(proposal)]
            matched = next((i for i, (a, b) in enumerate(zip(seen, proposal, strict=False)) if a != b),
                           len(seen))
            final = matched < len(seen) or len(seen) == len(proposal)
            policy.update(key, len(proposal), matched, entry, final)
            if final:
                del scoring[entry]

    def emit(token: int, from_draft: bool) -> Record:
        nonlocal finish
        stats.generated_tokens += 1
        stats.accepted_tokens += from_draft
        piece = text.push(engine.token_bytes(token))
        finish = finish_after(stats, text, max_tokens, cancel, len(tokens), engine.n_ctx)
        stats.decode_s = time.perf_counter() - t_first
        stats.plain_estimate_s = (stats.generated_tokens - 1) * policy.curve.t1
        if finish:
            piece += text.flush()
        return Record(piece, token, stats, from_draft=from_draft, finish_reason=finish)

    finish: str | None = None
    while True:
        if not ignore_eog and engine.is_eog(pending):
            stats.decode_s = time.perf_counter() - t_first
            yield Record(text.flush(), None, stats, finish_reason="eog")
            return
        yield emit(pending, False)
        if finish:
            return
        tokens.append(pending)
        score()

        # draft: the first source with a proposal worth verifying
        room = min(max_tokens - stats.generated_tokens, engine.n_ctx - len(tokens) - 1, policy.max_draft)
        draft: list[int] = []
        source = ""
        for part in parts:
            if room <= 0:
                break
            if part.costly and not policy.could_pay(f"{part.name}:new"):
                continue  # even a 95%-right draft from this source would cost more than it saves
            want = room if not part.costly else policy.choose(f"{part.name}:new", room)
            if want <= 0:
                continue
            t_draft = time.perf_counter()
            proposal = part.propose(tokens, want)
            if part.costly and proposal:
                seconds = (time.perf_counter() - t_draft) / len(proposal)
                for state in ("new", "run"):
                    policy.observe_draft_cost(f"{part.name}:{state}", seconds)
            if proposal:
                source = f"{part.name}:{'run' if in_run.get(part.name) else 'new'}"
                k = policy.choose(source, len(proposal)) if not part.costly else len(proposal)
                scoring[len(tokens)] = (source, proposal, len(tokens))
                draft = proposal[:k]
                expected = policy.stats(source).expected_accepted(len(draft)) if draft else 0.0
                break

        alternatives: list[list[int]] = []
        if draft and tree_width > 1 and sampling.greedy and hasattr(part, "alternatives"):
            alternatives = [alt for alt in part.alternatives(tokens, TREE_BRANCH, tree_width - 1)
                            if alt[0] != draft[0]][:tree_width - 1]
        t_batch = time.perf_counter()
        if alternatives:  # a token tree: the draft and other continuations, verified in one batch
            nodes = tree.build([draft, *alternatives])
            path, pending = tree.verify(engine, pending, nodes, 1 + len(alternatives))
            n_drafted = len(nodes)
        else:  # the pending token and the draft in one batch, logits for every position
            engine.decode([pending, *draft], all_logits=bool(draft))
            path = []
            for i, token in enumerate(draft):
                kept, pending = picker.verify(i, token, [*tokens[-last_n:], *path] if last_n else ())
                if not kept:
                    break
                path.append(token)
            else:
                pending = picker.pick(len(draft) if draft else -1, [*tokens[-last_n:], *path] if last_n else ())
            n_drafted = len(draft)
        policy.curve.observe(n_drafted + 1, time.perf_counter() - t_batch)
        if draft:
            stats.drafted_tokens += n_drafted
            stats.draft_steps += 1

        # emit the accepted tokens; an end-of-generation token among them is the next pending one
        accepted = 0
        for token in path:
            if not ignore_eog and engine.is_eog(token):
                pending = token
                break
            accepted += 1
            record = emit(token, True)
            if finish:
                engine.truncate(len(tokens) + 1)  # keep the text up to this token, drop the rest
                yield record
                return
            yield record
            tokens.append(token)
        if draft:
            if policy.fixed is None:
                policy.settle(source, expected, min(accepted, len(draft)))
            engine.truncate(len(tokens))  # drop the rejected drafts from the KV cache
            in_run[source.split(":")[0]] = accepted >= len(draft)
            score()
        drafter.feedback(tokens, accepted)
