"""`edgellm bench MODEL`: prompt processing (pp) and decode (tg) speed, measured like llama-bench.

pp: a batch of N random tokens into an empty KV cache. tg: N single-token decodes. One warm-up run,
then `--repetitions` runs; the table shows the median and the spread.
`--parallel N`: N sessions through the scheduler at once, each a -p token prompt and -g new tokens (the
shape of `llama-batched-bench -npp 128 -ntg 128 -npl N`): the aggregate decode tokens/s and each session's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from edgellm.errors import EdgeLLMError
from edgellm.models import resolve
from edgellm.options import add_model_arguments, load_options
from edgellm.runtime.engine import Engine


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("-p", "--n-prompt", type=int, default=None,
                   help="prompt tokens for pp, 0 skips it (default 512; 128 per session with --parallel)")
    p.add_argument("-g", "--n-gen", type=int, default=128, help="tokens for tg (0: skip)")
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("--cost-curve", action="store_true",
                   help="measure the batch-cost curve speculative decoding uses (1 to 33 tokens) and keep it "
                        "(otherwise it starts from a pessimistic prior)")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="N concurrent sessions through the scheduler: aggregate decode tokens/s")
    p.add_argument("--json", action="store_true", help="print results as JSON")


def _random_tokens(engine: Engine, n: int, rng: random.Random) -> list[int]:
    return [rng.randrange(engine.n_vocab) for _ in range(n)]


def run_pp(engine: Engine, n: int, rng: random.Random) -> float:
    tokens = _random_tokens(engine, n, rng)
    engine.reset()
    t0 = time.perf_counter()
    engine.decode(tokens)
    engine.synchronize()
    return n / (time.perf_counter() - t0)


def run_tg(engine: Engine, n: int, rng: random.Random) -> float:
    tokens = _random_tokens(engine, n, rng)
    engine.reset()
    t0 = time.perf_counter()
    for token in tokens:
        engine.decode([token])
    engine.synchronize()
    return n / (time.perf_counter() - t0)


def measure(engine: Engine, test: str, n: int, repetitions: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    run = run_pp if test == "pp" else run_tg
    run(engine, min(n, 16), rng)  # warm-up
    return [run(engine, n, rng) for _ in range(repetitions)]


def run_parallel(engine: Engine, n: int, n_prompt: int, n_gen: int, rng: random.Random) -> dict:
    """N sessions at once; decode tokens/s from the step after the last prefill to the end."""
    from edgellm.memory.scheduler import Scheduler
    from edgellm.runtime.sampling import SamplingParams

    engine.reset()
    scheduler = Scheduler(engine)
    requests = [scheduler.submit(_random_tokens(engine, n_prompt, rng), SamplingParams.greedy_params(), n_gen,
                                 ignore_eog=True) for _ in range(n)]
    t0 = time.perf_counter()
    while any(not r.records for r in requests):
        scheduler.step()
    t_decode = time.perf_counter()
    steps = scheduler.steps
    scheduler.run()
    t1 = time.perf_counter()
    scheduler.close()
    generated = sum(r.stats.generated_tokens - 1 for r in requests)  # the first comes out of the prefill
    return {"aggregate_tps": generated / (t1 - t_decode), "prefill_s": t_decode - t0,
            "tps": [r.stats.decode_tps for r in requests], "decode_steps": scheduler.steps - steps}


def bench_parallel(a: argparse.Namespace) -> int:
    from dataclasses import replace

    n, n_prompt = a.parallel, a.n_prompt if a.n_prompt is not None else 128
    if n < 1 or n_prompt < 1 or a.n_gen < 2:
        raise EdgeLLMError("--parallel, -p need at least 1 and -g at least 2")
    options = replace(load_options(a), n_ctx=n * (n_prompt + a.n_gen + 8), n_seq_max=n, n_outputs=n,
                      n_batch=max(a.batch, min(n * n_prompt, 2048)))
    engine = Engine(resolve(a.model), options)
    rng = random.Random(0)
    run_parallel(engine, n, n_prompt, min(a.n_gen, 32), rng)  # warm-up: the first run at full size is slower
    runs = [run_parallel(engine, n, n_prompt, a.n_gen, rng) for _ in range(a.repetitions)]
    engine.close()
    middle = sorted(runs, key=lambda r: r["aggregate_tps"])[len(runs) // 2]
    out = {"model": str(engine.path), "parallel": n, "n_prompt": n_prompt, "n_gen": a.n_gen,
           "threads": engine.n_threads, "aggregate_tps": middle["aggregate_tps"], "tps": middle["tps"],
           "prefill_s": middle["prefill_s"], "decode_steps": middle["decode_steps"],
           "samples": [r["aggregate_tps"] for r in runs]}
    if a.json:
        print(json.dumps(out))
    else:
        print(f"{engine.info.name}: {n} sessions x (pp{n_prompt} + tg{a.n_gen}): "
              f"{out['aggregate_tps']:.2f} t/s together, "
              f"{statistics.median(out['tps']):.2f} t/s per session (median of {a.repetitions} runs)")
    return 0


def bench_cost_curve(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from edgellm.speculative.costs import measure, save

    options = replace(load_options(a), n_ctx=max(a.ctx or 0, 512))
    with Engine(resolve(a.model), options) as engine:
        curve = measure(engine)
        save(engine, curve)
    costs = {n: round(curve.cost(n), 2) for n in sorted(curve.seconds)}
    if a.json:
        print(json.dumps({"model": str(engine.path), "t1_s": curve.t1, "cost": costs}))
    else:
        print(f"{engine.info.name}: one token {curve.t1 * 1e3:.1f} ms; a batch of n costs "
              + ", ".join(f"c({n})={c}" for n, c in costs.items() if n in (2, 4, 8, 16, 33)) + " (kept)")
    return 0


def main(a: argparse.Namespace) -> int:
    if a.cost_curve:
        return bench_cost_curve(a)
    if a.parallel is not None:
        return bench_parallel(a)
    if a.n_prompt is None:
        a.n_prompt = 512
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
