#!/usr/bin/env python3
"""Speculative decoding against plain decoding, measured in one run.

Target Qwen2.5-Coder-1.5B-Instruct (draft: its 0.5B sibling), greedy, 192 new tokens, five prompts
of each workload (benchmarks/prompts.py): *edit* (the answer repeats most of the prompt's code) and
*generation* (new code). Speeds run from the request to the last token, so a draft model's prefill of the
prompt counts. For every prompt: plain t/s, then each method's t/s, speedup, acceptance and
mean accepted length. `ceiling` is the speedup that a perfect choice of draft length would reach with
the edit-aware lookup's own proposals on this machine's measured cost curve (a replay of the plain
output): what the drafts and the machine allow, before the policy's guesses.

    python benchmarks/speculative.py [--target qwen2.5-coder-1.5b] [--draft qwen2.5-coder-0.5b]
                                     [--methods edit,tree,draft,auto,ngram] [--n 192] [--repeat 3]
Models: python3 ../shared/dev-models/fetch.py --all
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import EDIT, GENERATION

from edgellm.decoding.records import Stats
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams
from edgellm.speculative.costs import CostCurve, load_or_measure
from edgellm.speculative.drafters import (
    Combined,
    DraftModel,
    EditAwareLookup,
    PromptLookup,
    check_vocab_compatible,
)
from edgellm.speculative.policy import Policy
from edgellm.speculative.setup import Speculator, note_draft_cost

GREEDY = SamplingParams.greedy_params()


def request_tps(s: Stats) -> float:
    """Tokens per second from the request to the last token, less nothing: a draft model's prefill of the
    prompt counts against it (the target's prefill is the same on both sides)."""
    return s.generated_tokens / (s.prefill_s + s.decode_s)


def ceiling(prompt: list[int], out: list[int], curve: CostCurve, max_draft: int = 32) -> float:
    """Replay the plain output: at each step verify exactly as many lookup tokens as pay best."""
    drafter = EditAwareLookup()
    drafter.start(prompt)
    tokens, t, cost = [*prompt, out[0]], 1, 1.0
    while t < len(out):
        proposal = drafter.propose(tokens, max_draft)
        right = next((i for i, (a, b) in enumerate(zip(proposal, out[t:], strict=False)) if a != b),
                     min(len(proposal), len(out) - t))
        k = max(range(right + 1), key=lambda k: (k + 1) / curve.cost(k + 1))
        cost += curve.cost(k + 1)
        tokens += out[t:t + k + 1]
        t += k + 1
        drafter.feedback(tokens, k)
    return len(out) / cost


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b")
    ap.add_argument("--methods", default="edit,tree,draft,auto")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="run only prompts whose name contains this")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each method per prompt (median shown)")
    a = ap.parse_args()
    methods = a.methods.split(",")

    # four sequences in one unified cache: token trees need them; plain decoding runs the same way
    target = Engine.load(a.target, n_ctx=4096, n_threads=a.threads, n_seq_max=4, kv_unified=True)
    draft_engine = None
    if {"draft", "auto"} & set(methods):
        draft_engine = Engine.load(a.draft, n_ctx=4096, n_threads=a.threads)
        check_vocab_compatible(target, draft_engine)
    curve = load_or_measure(target)
    print(f"target {target.path.name}, {a.threads} threads; batch cost c(n) relative to one token: "
          + ", ".join(f"c({n})={curve.cost(n):.2f}" for n in (2, 4, 8, 16, 32)))
    # a drafter that knew the whole answer: every batch as long as pays best, every token accepted
    best_n = max(curve.seconds, key=lambda n: n / curve.cost(n))
    print(f"every token drafted right: {best_n / curve.cost(best_n):.2f}x at {best_n} tokens per batch")

    def speculator(method: str) -> Speculator:
        if method == "tree":
            return Speculator(EditAwareLookup(), Policy(curve), tree_width=3)
        drafter = {"ngram": lambda: PromptLookup(), "edit": lambda: EditAwareLookup(),
                   "draft": lambda: Combined(DraftModel(draft_engine)),
                   "auto": lambda: Combined(EditAwareLookup(), DraftModel(draft_engine))}[method]()
        policy = Policy(curve)
        if method in ("draft", "auto"):
            note_draft_cost(policy, draft_engine)
        return Speculator(drafter, policy)

    print(f"{'workload':<11}{'prompt':<12}{'plain t/s':>10}{'ceiling':>8}"
          + "".join(f"{m + ' t/s':>11}{'x':>6}{'acc':>5}{'len':>5}" for m in methods))
    summary: dict[tuple[str, str], list[float]] = {}
    for workload, prompts in (("edit", EDIT), ("generation", GENERATION)):
        for name, messages in prompts.items():
            if a.only and a.only not in name:
                continue
            prompt = target.chat_tokens(messages)

            def plain_run(prompt: list[int] = prompt) -> tuple[float, list[int]]:
                target.reset()
                records = list(target.generate(prompt, GREEDY, max_tokens=a.n))
                return request_tps(records[-1].stats), [r.token for r in records if r.token is not None]

            # plain runs between the methods: each method is compared with the plain runs beside it,
            # so the machine's drift (±10% over minutes here) does not land on one side; with
            # --repeat R a method's figures are those of its median run of R
            before, out = plain_run()
            plains = [before]
            runs: dict[str, list[tuple[float, float, Stats]]] = {m: [] for m in methods}
            for _ in range(a.repeat):
                for method in methods:
                    target.reset()
                    records = list(target.generate(prompt, GREEDY, max_tokens=a.n,
                                                   speculator=speculator(method)))
                    after, _ = plain_run()
                    plains.append(after)
                    s = records[-1].stats
                    runs[method].append((request_tps(s) / ((before + after) / 2), request_tps(s), s))
                    before = after
            row = ""
            spread = []
            for method in methods:
                speedup, tps, s = sorted(runs[method], key=lambda r: r[0])[len(runs[method]) // 2]
                summary.setdefault((workload, method), []).append(speedup)
                row += f"{tps:>11.2f}{speedup:>6.2f}{s.acceptance:>5.2f}{s.mean_accepted:>5.1f}"
                if a.repeat > 1:  # run to run: the same text and choices should give the same speedup
                    spread.append(f"{method} " + ", ".join(f"{r[0]:.2f}x" for r in runs[method]))
            base = sum(plains) / len(plains)
            head = f"{workload:<11}{name:<12}{base:>10.2f}{ceiling(prompt, out, curve):>8.2f}"
            print(head + row, flush=True)
            if spread:
                print(f"{'':<23}runs: " + "; ".join(spread), flush=True)
    print()
    for (workload, method), speedups in summary.items():
        geo = math.exp(sum(math.log(x) for x in speedups) / len(speedups))
        print(f"{workload:<11}{method:<7} geometric mean {geo:.2f}x, min {min(speedups):.2f}x, "
              f"max {max(speedups):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
