#!/usr/bin/env python3
"""edgellm's decode speed against llama-bench's tg on the same GGUF, threads and depth, in one run.

For each dev model present (../shared/dev-models/fetch.py), rounds alternate between edgellm's real
generation loop (native greedy sampler, detokenization, stop checks: `Engine.generate`) and
`llama-bench -p 0 -n N -d DEPTH` built from the same vendored llama.cpp with the same CPU flags.
Prints the medians and their ratio; targets: >= 0.99 on Qwen2.5-Coder-1.5B, >= 0.97 on SmolLM2-135M.

    python benchmarks/decode.py [--rounds 5] [--n-gen 64] [--threads 2] [MODEL ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import tool_paths

from edgellm.errors import ModelNotFound
from edgellm.models import ALIASES, resolve
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import SamplingParams

TARGETS = {"smollm2-135m": 0.97, "qwen2.5-coder-1.5b": 0.99}
PROMPT = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]


def edgellm_tps(engine: Engine, prompt: list[int], n_gen: int) -> float:
    engine.reset()
    # n_gen + 1 records: the first token comes from the prefill, the next n_gen from decode steps
    *_, last = engine.generate(prompt, SamplingParams.greedy_params(), max_tokens=n_gen + 1,
                               ignore_eog=True)
    return last.stats.decode_tps


def llama_bench_tps(binary: Path, model: Path, n_gen: int, depth: int, threads: int) -> float:
    out = subprocess.run([str(binary), "-m", str(model), "-p", "0", "-n", str(n_gen), "-d", str(depth),
                          "-t", str(threads), "-r", "1", "-o", "json"],
                         capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(ALIASES))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="print every round")
    a = ap.parse_args()
    (bench,) = tool_paths("llama-bench")
    print(f"{'model':<22} {'llama-bench tg':>15} {'edgellm':>9} {'ratio':>7} {'target':>7}")
    for name in a.models:
        try:
            path = resolve(name)
        except ModelNotFound:
            print(f"{name:<22} (not present; fetch it with ../shared/dev-models/fetch.py)")
            continue
        with Engine(path, LoadOptions(n_ctx=1024, n_threads=a.threads)) as engine:
            prompt = engine.chat_tokens(PROMPT)
            edgellm_tps(engine, prompt, 8)  # warm-up
            ours, theirs = [], []
            for i in range(a.rounds):  # ABBA order: neither side always runs first
                if i % 2 == 0:
                    ours.append(edgellm_tps(engine, prompt, a.n_gen))
                theirs.append(llama_bench_tps(bench, path, a.n_gen, len(prompt), a.threads))
                if i % 2 == 1:
                    ours.append(edgellm_tps(engine, prompt, a.n_gen))
        o, t = statistics.median(ours), statistics.median(theirs)
        target = TARGETS.get(name)
        print(f"{name:<22} {t:>15.2f} {o:>9.2f} {o / t:>7.3f} {target or '':>7}", flush=True)
        if a.verbose:
            print(f"  edgellm {[round(x, 1) for x in ours]}\n  llama-bench {[round(x, 1) for x in theirs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
