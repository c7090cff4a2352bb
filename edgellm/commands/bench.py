"""`edgellm bench MODEL`: prompt processing (pp) and decode (tg) speed, measured like llama-bench.

pp: a batch of N random tokens into an empty KV cache. tg: N single-token decodes. One warm-up run,
then `--repetitions` runs; the table shows the median and the spread.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from ..engine import Engine
from ..models import resolve
from ..options import add_model_arguments, load_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for pp (0: skip)")
    p.add_argument("-g", "--n-gen", type=int, default=128, help="tokens for tg (0: skip)")
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print results as JSON")


def _random_tokens(engine: Engine, n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(engine.n_vocab) for _ in range(n)]


def run_pp(engine: Engine, n: int, rng: random.Random) -> float:
    tokens = _random_tokens(engine, n, rng)
    engine.reset()
    t0 = time.perf_counter()
    engine.decode(tokens)
    return n / (time.perf_counter() - t0)


def run_tg(engine: Engine, n: int, rng: random.Random) -> float:
    tokens = _random_tokens(engine, n, rng)
    engine.reset()
    t0 = time.perf_counter()
    for token in tokens:
        engine.decode([token])
    return n / (time.perf_counter() - t0)


def measure(engine: Engine, test: str, n: int, repetitions: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    run = run_pp if test == "pp" else run_tg
    run(engine, min(n, 16), rng)  # warm-up
    return [run(engine, n, rng) for _ in range(repetitions)]


def main(a: argparse.Namespace) -> int:
    options = load_options(a)
    need = max(a.n_prompt, a.n_gen) + 8
    if options.n_ctx is None or options.n_ctx < need:
        options = type(options)(**{**options.__dict__, "n_ctx": need})
    if options.n_batch < a.n_prompt:
        options = type(options)(**{**options.__dict__, "n_batch": a.n_prompt})
    engine = Engine(resolve(a.model), options)
    info = engine.info
    rows = []
    for test, n in (("pp", a.n_prompt), ("tg", a.n_gen)):
        if n > 0:
            speeds = measure(engine, test, n, a.repetitions)
            rows.append({"test": f"{test}{n}", "tps_median": statistics.median(speeds),
                         "tps_stdev": statistics.stdev(speeds) if len(speeds) > 1 else 0.0,
                         "samples": speeds})
    engine.close()
    if a.json:
        print(json.dumps({"model": str(info.path), "threads": engine.n_threads, "results": rows}))
        return 0
    print("| model | size | params | quant | threads | test | t/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {info.name} | {info.size_bytes / 2**20:.2f} MiB | {info.n_params / 1e6:.0f} M "
              f"| {info.file_type} | {engine.n_threads} | {r['test']} "
              f"| {r['tps_median']:.2f} ± {r['tps_stdev']:.2f} |")
    return 0
