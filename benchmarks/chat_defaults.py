#!/usr/bin/env python3
"""Which sampling settings and system prompt suit a model? Everyday questions, several seeds each.

For each candidate: how many replies end by themselves (end of turn before the token limit), and how many
of the factual ones contain the answer. The embedded SmolLM2's defaults in edgellm/model_defaults.toml
were chosen with this script; the README has its figures.

    python benchmarks/chat_defaults.py [--model smollm2-135m] [--seeds 5] [-n 256]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgellm.models import resolve
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import SamplingParams
from tests.support.questions import QUESTIONS

CANDIDATES: list[tuple[str, SamplingParams]] = [
    ("greedy", SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)),
    ("greedy, repeat 1.1", SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.1)),
    ("card: temp 0.2 top-p 0.9", SamplingParams(temperature=0.2, top_k=0, top_p=0.9, min_p=0.0)),
    ("llama.cpp: 0.8/40/0.95/0.05", SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05)),
    ("temp 0.5 k20 p0.8 rep1.1", SamplingParams(temperature=0.5, top_k=20, top_p=0.8, min_p=0.0, repeat_penalty=1.1)),
    ("temp 0.3 min-p 0.1 rep1.1", SamplingParams(temperature=0.3, top_k=0, top_p=1.0, min_p=0.1, repeat_penalty=1.1)),
    ("temp 0.2 min-p 0.1 rep1.1", SamplingParams(temperature=0.2, top_k=0, top_p=1.0, min_p=0.1, repeat_penalty=1.1)),
]
SYSTEMS = [None, "You are a helpful assistant."]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("-n", "--max-tokens", type=int, default=256)
    ap.add_argument("--show", action="store_true", help="print every reply")
    a = ap.parse_args()
    factual = [q for q in QUESTIONS if q.answer]
    print(f"{a.model}: {len(QUESTIONS)} questions ({len(factual)} factual) x {a.seeds} seeds, -n {a.max_tokens}")
    print(f"{'settings':<30}{'system prompt':<32}{'ended':>9}{'right':>9}{'mean tokens':>13}")
    with Engine(resolve(a.model), LoadOptions(n_ctx=2048)) as engine:
        for label, params in CANDIDATES:
            for system in SYSTEMS:
                ended = right = tokens = 0
                seeds = range(1 if params.greedy else a.seeds)
                for seed in seeds:
                    for q in QUESTIONS:
                        messages = [{"role": "system", "content": system}] if system else []
                        sampling = SamplingParams(**{**params.__dict__, "seed": seed})
                        records = list(engine.chat([*messages, {"role": "user", "content": q.text}],
                                                   sampling=sampling, max_tokens=a.max_tokens))
                        text = "".join(r.text for r in records)
                        ended += records[-1].finish_reason == "eog"
                        right += bool(q.answer and re.search(q.answer, text, re.IGNORECASE))
                        tokens += records[-1].stats.generated_tokens
                        if a.show:
                            print(f"  [{label} | {system} | {seed}] {q.text!r} -> {text[:160]!r}")
                n = len(seeds)
                print(f"{label:<30}{system or '(template default)':<32}{ended:>4}/{n * len(QUESTIONS):<4}"
                      f"{right:>4}/{n * len(factual):<4}{tokens / (n * len(QUESTIONS)):>13.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
