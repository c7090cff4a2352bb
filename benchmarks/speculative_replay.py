#!/usr/bin/env python3
"""Replay the speculative loop on recorded greedy outputs: the policy's choices, without the noise.

A run of benchmarks/speculative.py is noisy here (plain decoding drifts ±10% within minutes on 2
cores), so small policy changes cannot be judged by it. This replays the real loop
(`edgellm.decoding.steps.speculative_steps` and the emitter, the real drafters and policy) against a
stand-in target and sampler whose prediction at every position is the token that plain greedy decoding
produced there, and
whose batches cost what the machine's measured cost curve says. Greedy speculation is lossless, so
the drafts accepted are exactly those a real run accepts; the speedup printed is what the cost
curve gives for them, with the Python overhead left out.

    python benchmarks/speculative_replay.py --record     # decode the prompts plainly once (slow)
    python benchmarks/speculative_replay.py              # replay (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompts import EDIT, GENERATION
from speculative import ceiling

from edgellm import buildflags
from edgellm.decoding.emitter import Drafting, Emitter
from edgellm.decoding.steps import speculative_steps
from edgellm.runtime.sampling import SamplingParams
from edgellm.speculative.costs import CostCurve
from edgellm.speculative.drafters import EditAwareLookup, PromptLookup
from edgellm.speculative.policy import Policy

GREEDY = SamplingParams.greedy_params()


class ReplayTarget:
    """Predicts the recorded text; counts the cost of each batch on the machine's curve."""

    def __init__(self, truth: Sequence[int], n_vocab: int, curve: CostCurve) -> None:
        self.truth, self.n_vocab, self.curve = list(truth), n_vocab, curve
        self.n_ctx = len(truth) + 64
        self.kv: list[int] = []
        self.rows: list[int] = []  # positions whose logits the last batch produced
        self.cost = 0.0
        self.ctx = None  # the stand-in sampler reads `predict`, not llama.cpp's logits

    def prefill(self, tokens: Sequence[int]) -> int:
        self.kv = list(tokens)
        self.rows = [len(tokens) - 1]
        return len(tokens)

    def decode(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        start = len(self.kv)
        self.kv += tokens
        self.rows = list(range(start, len(self.kv))) if all_logits else [len(self.kv) - 1]
        self.cost += self.curve.cost(len(tokens))

    def decode_one(self, token: int) -> None:
        self.decode([token])

    def predict(self, index: int = -1) -> int:
        pos = self.rows[index]
        # right only while the context so far is the recorded one, as the loop reads it
        assert self.kv[:pos + 1] == self.truth[:pos + 1], "read past a rejected draft"
        return self.truth[pos + 1] if pos + 1 < len(self.truth) else 0  # past the end: unread

    def rewind(self, n: int) -> None:
        del self.kv[n:]

    def is_eog(self, token: int) -> bool:
        return False

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return b"x"


class ReplaySampler:
    """Greedy on the recorded text: the target's choice at a row is the token plain decoding wrote there."""

    params = GREEDY

    def __init__(self, target: ReplayTarget) -> None:
        self.target = target

    def sample(self, ctx: object, index: int = -1) -> int:
        return self.target.predict(index)

    def verify(self, ctx: object, index: int, draft: int) -> tuple[bool, int]:
        best = self.target.predict(index)
        return best == draft, best


def record(path: Path, target_name: str, n: int, threads: int) -> None:
    from edgellm.runtime.engine import Engine
    from edgellm.speculative.costs import load_or_measure

    target = Engine.load(target_name, n_ctx=4096, n_threads=threads, n_seq_max=4, kv_unified=True)
    curve = load_or_measure(target)
    runs = {}
    for workload, prompts in (("edit", EDIT), ("generation", GENERATION)):
        for name, messages in prompts.items():
            prompt = target.chat_tokens(messages)
            target.reset()
            out = [r.token for r in target.generate(prompt, GREEDY, max_tokens=n) if r.token is not None]
            runs[name] = {"workload": workload, "prompt": prompt, "output": out}
            print(f"recorded {name}: {len(out)} tokens", flush=True)
    data = {"model": target.path.name, "n_vocab": target.n_vocab, "curve": curve.seconds, "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def replay(prompt: list[int], out: list[int], n_vocab: int, curve: CostCurve,
           method: str) -> tuple[float, float, float]:
    """(speedup on the curve, acceptance, mean accepted length) of one method on one recorded run."""
    target = ReplayTarget(prompt + out, n_vocab, curve)
    target.prefill(prompt)
    drafter = PromptLookup() if method == "ngram" else EditAwareLookup()
    emitter = Emitter(target, len(prompt), target.n_ctx, (), len(out), None, ignore_eog=True)
    emitter.drafting = Drafting()
    steps = speculative_steps(target, ReplaySampler(target), prompt, drafter, Policy(curve), emitter.drafting,
                              len(out))
    records = []
    for token, from_draft in steps:
        records.append(emitter.emit(token, from_draft))
        if records[-1].finish_reason:
            break
    steps.close()
    produced = [r.token for r in records if r.token is not None]
    assert produced == out, "the replay must reproduce the recorded text"
    s = records[-1].stats
    return (len(out) - 1) / target.cost, s.acceptance, s.mean_accepted


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="decode the prompts plainly and save the outputs")
    ap.add_argument("--target", default="qwen2.5-coder-1.5b")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="edit,ngram")
    ap.add_argument("--file", type=Path, default=buildflags.cache_dir() / "replay" / "speculative.json")
    a = ap.parse_args()
    if a.record or not a.file.exists():
        record(a.file, a.target, a.n, a.threads)
    data = json.loads(a.file.read_text())
    curve = CostCurve({int(k): v for k, v in data["curve"].items()})  # measured: the replay's timings leave it
    print(f"{data['model']}: batch cost " + ", ".join(f"c({n})={curve.cost(n):.2f}" for n in (2, 4, 8, 16, 32)))
    methods = a.methods.split(",")
    print(f"{'workload':<11}{'prompt':<12}{'ceiling':>8}" + "".join(f"{m + ' x':>9}{'acc':>6}{'len':>6}" for m in methods))
    speedups: dict[tuple[str, str], list[float]] = {}
    for name, run in data["runs"].items():
        row = f"{run['workload']:<11}{name:<12}{ceiling(run['prompt'], run['output'], curve):>8.2f}"
        for method in methods:
            x, acc, mean = replay(run["prompt"], run["output"], data["n_vocab"], curve, method)
            speedups.setdefault((run["workload"], method), []).append(x)
            row += f"{x:>9.2f}{acc:>6.2f}{mean:>6.1f}"
        print(row, flush=True)
    for (workload, method), xs in speedups.items():
        geo = math.exp(sum(math.log(x) for x in xs) / len(xs))
        print(f"{workload:<11}{method:<7} geometric mean {geo:.2f}x, min {min(xs):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
