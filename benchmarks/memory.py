#!/usr/bin/env python3
"""The memory planner's predicted peak RSS against the measured one, and the default load against the old.

Each case runs in a fresh subprocess: plan (llama.cpp's dry run), load what the plan says, prefill every
slot with a prompt longer than a ubatch (so the compute buffer is used whole), generate, then read the
process's peak RSS (VmHWM). Cases: each dev model at three context sizes, 1 and 4 slots, and the 1.5B
with its 0.5B draft. Goal: every prediction within +-5%.

`--compare-load` also runs the 1.5B as `edgellm run` loaded before the planner (mmap, logits reserved for
a whole batch) and as now, with the prefill and decode speed of each: goal >= 25% less at equal speed.

    python benchmarks/memory.py [--models smollm2-135m ...] [--contexts 2048 4096 8192] [--compare-load]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from present import present_models

MIB = 1 << 20
MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
DRAFTS = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}
TEXT = ("The history of computing is a story of machines that got smaller and faster while the problems "
        "they were asked to solve grew larger. ") * 80


def hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def worker(model: str, n_ctx: int, slots: int, draft: str | None, mode: str) -> dict:
    """Runs in its own process: returns predicted and measured bytes."""
    from edgellm.memory.plan import PlanRequest, make_plan
    from edgellm.memory.scheduler import Scheduler
    from edgellm.models import resolve
    from edgellm.runtime.engine import Engine, LoadOptions
    from edgellm.runtime.sampling import SamplingParams
    from edgellm.speculative.setup import make_speculator

    path = resolve(model)
    greedy = SamplingParams.greedy_params()
    if mode == "old":  # the load before the planner: mmap, n_outputs = n_batch
        engine = Engine(path, LoadOptions(n_ctx=n_ctx, use_mmap=True))
        predicted = 0
    else:
        plan = make_plan(path, PlanRequest(n_ctx=n_ctx, parallel=slots, draft=str(resolve(draft)) if draft else None,
                                           kv_type="f16"))
        engine = Engine(path, plan.load_options())
        predicted = plan.peak_bytes
    prompt_len = min(n_ctx - 64, 700)
    prompt = engine.tokenize(TEXT)[:prompt_len]
    out = {"model": model, "n_ctx": n_ctx, "slots": slots, "draft": draft, "mode": mode, "predicted": predicted}
    if slots > 1:
        scheduler = Scheduler(engine)
        for i in range(slots):
            scheduler.submit([*prompt[: prompt_len - 8], *engine.tokenize(f" part {i}", add_special=False)],
                             greedy, 16, ignore_eog=True)
        scheduler.run()
    else:
        speculator = make_speculator(engine, str(resolve(draft))) if draft else None
        *_, last = engine.generate(prompt, greedy, max_tokens=64, ignore_eog=True, speculator=speculator)
        out["prefill_tps"], out["decode_tps"] = last.stats.prefill_tps, last.stats.decode_tps
    out["measured"] = hwm()
    return out


def run_case(model: str, n_ctx: int, slots: int, draft: str | None, mode: str = "plan") -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps([model, n_ctx, slots, draft, mode])]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--contexts", nargs="*", type=int, default=[2048, 4096, 8192])
    ap.add_argument("--compare-load", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(*json.loads(a.worker))))
        return 0

    print(f"{'model':<20} {'ctx':>5} {'slots':>5} {'draft':<20} {'predicted':>10} {'measured':>10} {'error':>7}")
    worst = 0.0
    for model, _ in present_models(a.models):
        cases = [(c, s, None) for c in a.contexts for s in (1, 4)]
        if model in DRAFTS:
            cases += [(c, 1, DRAFTS[model]) for c in a.contexts]
        for n_ctx, slots, draft in cases:
            r = run_case(model, n_ctx, slots, draft)
            error = r["predicted"] / r["measured"] - 1
            worst = max(worst, abs(error))
            print(f"{model:<20} {n_ctx:>5} {slots:>5} {draft or '-':<20} {r['predicted'] / MIB:>8.0f} M "
                  f"{r['measured'] / MIB:>8.0f} M {error:>+7.1%}", flush=True)
    print(f"worst error {worst:.1%} (goal 5%)")
    if a.compare_load:
        model = "qwen2.5-coder-1.5b"
        for n_ctx in (4096, 16384):
            old, new = run_case(model, n_ctx, 1, None, "old"), run_case(model, n_ctx, 1, None, "plan")
            print(f"{model} ctx {n_ctx}: before the planner {old['measured'] / MIB:.0f} MiB "
                  f"(pp {old['prefill_tps']:.1f}, tg {old['decode_tps']:.1f} t/s), now {new['measured'] / MIB:.0f} MiB "
                  f"(pp {new['prefill_tps']:.1f}, tg {new['decode_tps']:.1f} t/s): "
                  f"{1 - new['measured'] / old['measured']:.1%} less, tg ratio {new['decode_tps'] / old['decode_tps']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
