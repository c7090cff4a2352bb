#!/usr/bin/env python3
"""edgellm's decode speed with the defaults, beside --draft off and llama-bench's tg, in one run.

For each dev model present (../shared/dev-models/fetch.py), rounds alternate between
- *default*: what `edgellm run MODEL` loads and decodes with no flags: the memory plan, the model's own
  sampling defaults and `--draft auto` (lookup drafts, a draft model only where the cost curve says it
  pays), through the one decoding loop (`Engine.generate`);
- *draft off*: the same with `--draft off`;
- `llama-bench -p 0 -n N -d DEPTH`, built from the same vendored llama.cpp with the same CPU flags.
Every reply runs N tokens past end-of-turn, as llama-bench does. Prints the medians and the ratios to
llama-bench; goal: default >= 1.0x on SmolLM2-135M and Qwen2.5-Coder-1.5B.

    python benchmarks/decode.py [--rounds 8] [--n-gen 64] [--threads 2] [MODEL ...]
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
from present import present_models

from edgellm.cli import command_parser
from edgellm.gguf_info import read_info
from edgellm.models import ALIASES, resolve
from edgellm.options import planned_load, sampling_defaults
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams
from edgellm.speculative.setup import Speculator, make_speculator

PROMPT = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]


def edgellm_tps(engine: Engine, prompt: list[int], n_gen: int, sampling: SamplingParams,
                speculator: Speculator | None) -> tuple[float, int]:
    """(decode tokens/s, tokens drafted) of one reply."""
    engine.reset()
    # n_gen + 1 records: the first token comes from the prefill, the next n_gen from decode steps
    *_, last = engine.generate(prompt, sampling, max_tokens=n_gen + 1, ignore_eog=True, speculator=speculator)
    return last.stats.decode_tps, last.stats.drafted_tokens


def as_run_loads(name: str, threads: int, draft: str) -> tuple[Engine, SamplingParams, Speculator | None, str]:
    """The engine, sampling and speculator `edgellm run NAME --threads T [--draft off]` would use."""
    parser, _ = command_parser("run")
    a = parser.parse_args([name, "x", "--threads", str(threads), "--draft", draft])
    info = read_info(resolve(name))
    planned = planned_load(a, info)
    engine = Engine(planned.path, planned.options)
    speculator = make_speculator(engine, planned.draft, draft_gpu_layers=planned.draft_gpu_layers)
    return engine, sampling_defaults(a, info).sampling, speculator, planned.plan.draft_reason


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
    print(f"{'model':<22} {'llama-bench tg':>15} {'default':>9} {'x':>6} {'draft off':>10} {'x':>6} {'drafted':>8}")
    for name, path in present_models(a.models):
        sides: dict[str, list[float]] = {"auto": [], "off": []}
        drafted = {"auto": 0, "off": 0}
        theirs: list[float] = []
        for draft in ("auto", "off"):  # one engine at a time, as a user's process holds one
            engine, sampling, speculator, why = as_run_loads(name, a.threads, draft)
            prompt = engine.chat_tokens(PROMPT)
            edgellm_tps(engine, prompt, 8, sampling, speculator)  # warm-up
            for i in range(a.rounds):  # ABBA order: neither side always runs first
                if i % 2 == 0:
                    ours, n = edgellm_tps(engine, prompt, a.n_gen, sampling, speculator)
                theirs.append(llama_bench_tps(bench, path, a.n_gen, len(prompt), a.threads))
                if i % 2 == 1:
                    ours, n = edgellm_tps(engine, prompt, a.n_gen, sampling, speculator)
                sides[draft].append(ours)
                drafted[draft] += n
            if draft == "auto":
                print(f"  default: {why}")
            if speculator is not None:
                speculator.close()
            engine.close()
        t = statistics.median(theirs)
        d, o = statistics.median(sides["auto"]), statistics.median(sides["off"])
        print(f"{name:<22} {t:>15.2f} {d:>9.2f} {d / t:>6.3f} {o:>10.2f} {o / t:>6.3f} {drafted['auto']:>8}", flush=True)
        if a.verbose:
            print(f"  default {[round(x, 1) for x in sides['auto']]}\n  draft off {[round(x, 1) for x in sides['off']]}"
                  f"\n  llama-bench {[round(x, 1) for x in theirs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
