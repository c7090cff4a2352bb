#!/usr/bin/env python3
"""Aggregate decode throughput of N concurrent sessions through the scheduler, in one run, against:

- the same sessions run one after another (Engine.generate, one at a time);
- llama.cpp's own parallel decoding, `llama-batched-bench -npp P -ntg G -npl N` (S_TG), built from the
  same vendored source with the same CPU flags (llama_tools.py);
- the batch cost curve: N / t(N), where t(N) is one llama_decode of N tokens on N sequences at the same
  depth (what batching allows before any Python work).

Goals: 4 sessions >= 1.0x llama-batched-bench, and >= 0.9x the cost curve. `--resume`: the time to the
first token of a 2,000-token conversation swapped to disk and back, against prefilling it anew (<= 10%).

    python benchmarks/scheduler.py [--models smollm2-135m qwen2.5-coder-1.5b] [--sessions 1 2 4 8] [-p 128 -g 128]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support, edgellm
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import tool_paths
from present import present_models

from edgellm.commands.bench import run_parallel
from edgellm.memory.scheduler import Scheduler
from edgellm.models import resolve
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import SamplingParams


def batched_bench(binary: Path, model: Path, n: int, pp: int, tg: int, threads: int) -> float:
    out = subprocess.run([str(binary), "-m", str(model), "-c", str(n * (pp + tg + 8)), "-b", "2048",
                          "-ub", "512", "-npp", str(pp), "-ntg", str(tg), "-npl", str(n), "-t", str(threads),
                          "--output-format", "jsonl"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return float(rows[-1]["speed_tg"])


def one_after_another(engine: Engine, n: int, pp: int, tg: int, rng: random.Random) -> float:
    generated, seconds = 0, 0.0
    for _ in range(n):
        engine.reset()
        prompt = [rng.randrange(engine.n_vocab) for _ in range(pp)]
        *_, last = engine.generate(prompt, SamplingParams.greedy_params(), max_tokens=tg, ignore_eog=True)
        generated += last.stats.generated_tokens - 1
        seconds += last.stats.decode_s
    return generated / seconds


def cost_curve(engine: Engine, n: int, depth: int, rng: random.Random, steps: int = 16) -> float:
    """N / t(N): N sequences each at `depth`, one token each per llama_decode."""
    import llama_cpp as C

    engine.reset()
    for seq in range(n):
        tokens = [rng.randrange(engine.n_vocab) for _ in range(depth)]
        for start in range(0, depth, engine.n_batch):
            chunk = tokens[start:start + engine.n_batch]
            engine._batch.fill(chunk, start, seq_id=seq)
            C.llama_decode(engine.ctx, engine._batch.raw)
    b = engine._batch.raw
    times = []
    for step in range(steps):
        for seq in range(n):
            b.token[seq], b.pos[seq], b.n_seq_id[seq], b.logits[seq] = rng.randrange(engine.n_vocab), depth + step, 1, True
            b.seq_id[seq][0] = seq
        b.n_tokens = n
        t0 = time.perf_counter()
        C.llama_decode(engine.ctx, b)
        C.llama_synchronize(engine.ctx)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def first_token_s(scheduler: Scheduler, prompt: list[int], session: str) -> float:
    t0 = time.perf_counter()
    request = scheduler.submit(prompt, SamplingParams.greedy_params(), 8, session=session, ignore_eog=True)
    while not request.records:
        scheduler.step()
    seconds = time.perf_counter() - t0
    scheduler.run()
    return seconds


def resume(path: Path, n_history: int, threads: int) -> tuple[float, float]:
    """(time to first token of a conversation swapped to disk and back, of the same prompt prefilled anew)."""
    rng = random.Random(1)
    options = LoadOptions(n_ctx=2 * (n_history + 256), n_seq_max=2, n_outputs=2, n_threads=threads)
    with Engine(path, options) as engine, tempfile.TemporaryDirectory() as tmp:
        scheduler = Scheduler(engine, Path(tmp))
        history = [rng.randrange(engine.n_vocab) for _ in range(n_history)]
        first_token_s(scheduler, history, "a")
        for other in ("b", "c"):  # both slots taken by others: "a" goes to disk
            first_token_s(scheduler, [rng.randrange(engine.n_vocab) for _ in range(64)], other)
        assert "a" in scheduler.swapped
        follow_up = [*history, *[rng.randrange(engine.n_vocab) for _ in range(24)]]
        resumed = first_token_s(scheduler, follow_up, "a")
        assert scheduler.swaps_in == 1
        fresh = first_token_s(scheduler, follow_up, "fresh")
        scheduler.close()
    return resumed, fresh


def speculation(path: Path, n: int, threads: int, rounds: int) -> tuple[float, float, int, int]:
    """Plain vs per-sequence lookup speculation through the scheduler on edit prompts (copy, rename):
    (plain t/s, speculative t/s, drafted, accepted), medians of alternating rounds."""
    from edgellm.speculative.costs import load_or_measure
    from edgellm.speculative.policy import Policy
    from tests.test_speculative import PROMPTS as EDITS

    options = LoadOptions(n_ctx=n * 1024, n_seq_max=n, n_outputs=n * 33, n_threads=threads)
    with Engine(path, options) as engine:
        curve = load_or_measure(engine)
        prompts = [engine.chat_tokens([{"role": "user", "content": EDITS[("copy", "rename")[i % 2]]}])
                   for i in range(n)]
        speeds: dict[bool, list[float]] = {False: [], True: []}
        counts = (0, 0)
        for _ in range(rounds + 1):  # the first round warms up
            for speculate in (False, True):
                engine.reset()
                scheduler = Scheduler(engine, policy=Policy(curve) if speculate else None)
                requests = [scheduler.submit(p, SamplingParams.greedy_params(), 96) for p in prompts]
                while any(not r.records for r in requests):
                    scheduler.step()
                t0 = time.perf_counter()
                scheduler.run()
                speeds[speculate].append(sum(r.stats.generated_tokens - 1 for r in requests) / (time.perf_counter() - t0))
                if speculate:
                    counts = (sum(r.stats.drafted_tokens for r in requests), sum(r.stats.accepted_tokens for r in requests))
        return statistics.median(speeds[False][1:]), statistics.median(speeds[True][1:]), *counts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    ap.add_argument("--sessions", nargs="*", type=int, default=[1, 2, 4, 8])
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-g", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speculation", action="store_true",
                    help="only: plain vs per-sequence lookup speculation on edit prompts, 1 and 4 sessions")
    ap.add_argument("--resume", type=int, default=2000, metavar="TOKENS",
                    help="also: a conversation of this many tokens swapped out and back (0: skip)")
    a = ap.parse_args()
    if a.speculation:
        for name in a.models:
            for n in (1, 4):
                plain, spec, drafted, accepted = speculation(resolve(name), n, a.threads, a.rounds)
                print(f"{name:<20} {n} session(s): plain {plain:.1f} t/s, speculating {spec:.1f} t/s "
                      f"({spec / plain:.2f}x; {accepted} of {drafted} drafted tokens kept)", flush=True)
        return 0
    (binary,) = tool_paths("llama-batched-bench")
    print(f"{'model':<20} {'N':>3} {'edgellm':>9} {'one by one':>10} {'batched-bench':>13} {'ratio':>6} "
          f"{'curve':>8} {'of curve':>8}")
    for name, path in present_models(a.models):
        for n in a.sessions:
            rng = random.Random(0)
            ours, theirs, alone, curve = [], [], [], []
            options = LoadOptions(n_ctx=n * (a.p + a.g + 8), n_seq_max=n, n_outputs=n, n_threads=a.threads,
                                  n_batch=max(512, min(n * a.p, 2048)))
            with Engine(path, options) as engine:
                run_parallel(engine, n, a.p, a.g, rng)  # warm-up at full size: the first run is 5-20% slower
                for _ in range(a.rounds):  # alternate, so drift hits both
                    ours.append(run_parallel(engine, n, a.p, a.g, rng)["aggregate_tps"])
                    theirs.append(batched_bench(binary, path, n, a.p, a.g, a.threads))
                alone.append(one_after_another(engine, min(n, 2), a.p, a.g, rng))
                curve.append(cost_curve(engine, n, a.p + a.g // 2, rng))
            m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
            m_curve = statistics.median(curve)
            print(f"{name:<20} {n:>3} {m_ours:>9.1f} {statistics.median(alone):>10.1f} {m_theirs:>13.1f} "
                  f"{m_ours / m_theirs:>6.3f} {m_curve:>8.1f} {m_ours / m_curve:>8.3f}", flush=True)
        if a.resume:
            resumed, fresh = resume(path, a.resume, a.threads)
            print(f"{name:<20} a {a.resume}-token conversation back from disk: first token in {resumed * 1e3:.0f} ms, "
                  f"prefilled anew {fresh * 1e3:.0f} ms ({resumed / fresh:.1%}; goal <= 10%)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
