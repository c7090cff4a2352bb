"""Step generators: each yields `(token, from_draft)` for one sequence, and decodes what it yields.

The consumer (stream.py's loop, through the emitter) reads one token at a time and closes the generator
when the reply ends; the generator then leaves the KV cache holding exactly the tokens before the last
one it yielded. Shapes: mlx-lm's `generate_step` and `speculative_generate_step`.

Speculative decoding: a drafter proposes, the target verifies the whole draft in one batch. Greedy: a
drafted token is kept while it equals the target's choice. Sampling: it is kept with probability p(d)
(drafts are deterministic, q(d) = 1), else the target samples from p with d removed (Sampler.verify);
either way the output follows the target's distribution exactly. Rejected tokens leave the KV cache
before the next step.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from edgellm.decoding.emitter import Drafting
from edgellm.runtime.sampling import Sampler
from edgellm.speculative import tree
from edgellm.speculative.drafters import Drafter
from edgellm.speculative.policy import WARMUP_STEPS, Policy

if TYPE_CHECKING:
    from edgellm.runtime.engine import Engine

Step = tuple[int, bool]
TREE_BRANCH = 4  # tokens in each alternative branch of a token tree


def plain_steps(engine: Engine, sampler: Sampler) -> Iterator[Step]:
    """One token per decode; the chain picks each."""
    while True:
        token = sampler.sample(engine.ctx, -1)
        yield token, False
        engine.decode_one(token)


def speculative_steps(engine: Engine, sampler: Sampler, prompt: Sequence[int], drafter: Drafter, policy: Policy,
                      drafting: Drafting, max_tokens: int, tree_width: int = 1) -> Iterator[Step]:
    """Drafts verified in one batch each; `tree_width` > 1 verifies token trees (greedy only).

    The policy picks each draft's length (0: decode plainly) from the sources' scored proposals and the
    machine's batch-cost curve; every proposal is scored against the text that follows, verified or not.
    """
    tokens = list(prompt)  # the context: the KV cache holds all of it (the pending token is not in it)
    drafter.start(tokens)
    parts: Sequence[Drafter] = getattr(drafter, "parts", (drafter,))
    drafting.plain_t1 = policy.curve.t1
    in_run: dict[str, bool] = {}  # per source: was its last draft accepted whole?
    scoring: dict[int, tuple[str, list[int], int]] = {}  # id -> (stats key, proposal, where it starts)

    def score() -> None:
        for entry, (key, proposal, start) in list(scoring.items()):
            seen = tokens[start:start + len(proposal)]
            matched = next((i for i, (a, b) in enumerate(zip(seen, proposal, strict=False)) if a != b), len(seen))
            final = matched < len(seen) or len(seen) == len(proposal)
            policy.update(key, len(proposal), matched, entry, final)
            if final:
                del scoring[entry]

    # Lookups cost Python time on every step (~0.25 ms: 4% of a SmolLM2 token); a reply whose accepted tokens
    # saved less decode time than that bookkeeping took decodes plainly from then on, as plain_steps does
    judged = not any(part.costly for part in parts) and policy.fixed is None
    bookkeeping, saved_tokens, steps = 0.0, 0, 0
    pending = sampler.sample(engine.ctx, -1)
    while True:
        yield pending, False
        tokens.append(pending)
        if judged and steps >= WARMUP_STEPS and saved_tokens * policy.curve.t1 < bookkeeping:
            engine.decode_one(pending)
            pending = sampler.sample(engine.ctx, -1)
            continue
        steps += 1
        t_book = time.perf_counter()
        score()

        # draft: the first source with a proposal worth verifying
        generated = len(tokens) - len(prompt)
        room = min(max_tokens - generated, engine.n_ctx - len(tokens) - 1, policy.max_draft)
        draft: list[int] = []
        source, expected, part = "", 0.0, None
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

        bookkeeping += time.perf_counter() - t_book
        alternatives: list[list[int]] = []
        if draft and tree_width > 1 and sampler.params.greedy and hasattr(part, "alternatives"):
            alternatives = [alt for alt in part.alternatives(tokens, TREE_BRANCH, tree_width - 1)
                            if alt[0] != draft[0]][:tree_width - 1]
        t_batch = time.perf_counter()
        path: list[int] = []
        if alternatives:  # a token tree: the draft and other continuations, verified in one batch (greedy)
            nodes = tree.build([draft, *alternatives])
            path, pending = tree.verify(engine, sampler, pending, nodes, 1 + len(alternatives))
            n_drafted = len(nodes)
        elif draft:  # the pending token and the draft in one batch, logits for every position
            engine.decode([pending, *draft], all_logits=True)
            for i, token in enumerate(draft):
                kept, pending = sampler.verify(engine.ctx, i, token)
                if not kept:
                    break
                path.append(token)
            else:
                pending = sampler.sample(engine.ctx, len(draft))
            n_drafted = len(draft)
        else:
            engine.decode_one(pending)
            pending = sampler.sample(engine.ctx, -1)
            n_drafted = 0
        policy.curve.observe(n_drafted + 1, time.perf_counter() - t_batch)
        if n_drafted:
            drafting.drafted_tokens += n_drafted
            drafting.draft_steps += 1

        # the accepted tokens are in the KV cache already; an early end drops the one it ended on
        t_book = time.perf_counter()
        accepted = 0
        for token in path:
            try:
                yield token, True
            except GeneratorExit:
                engine.rewind(len(tokens))
                raise
            accepted += 1
            tokens.append(token)
        if draft:
            if policy.fixed is None:
                policy.settle(source, expected, min(accepted, len(draft)))
            engine.rewind(len(tokens))  # drop the rejected drafts from the KV cache
            in_run[source.split(":")[0]] = accepted >= len(draft)
            score()
        drafter.feedback(tokens, accepted)
        saved_tokens += accepted
        bookkeeping += time.perf_counter() - t_book
