#!/usr/bin/env python3
"""A model split over RPC workers on loopback, beside llama.cpp's own `llama-bench --rpc` + `ggml-rpc-server`.

For the model (default Qwen2.5-Coder-1.5B), with 0 (local), 1 and 2 workers, in one run:
- prefill (pp512) and decode (tg64) tokens/s of random tokens, every layer on the workers (`-ngl 99`, as
  llama-bench places RPC devices): edgellm's engine with `edgellm worker`s, and `llama-bench --rpc` with
  `ggml-rpc-server`s, both built from the same vendored llama.cpp with the same CPU flags;
- bytes sent per decoded token (loopback's transmitted bytes during tg64 / 64; both directions);
- the time to load the model onto one worker with an empty tensor cache, and again with the cache warm
  (edgellm: the engine's load in-process; llama.cpp: llama-bench's wall time for `-p 0 -n 1`, which adds a
  process start and one token);
- what the supervised child process costs per token: greedy replies of `--tokens` through
  edgellm/remote (a child process with the scheduler, its tokens sent back as JSON lines) against the same
  engine in-process.
Prints the figures and the ratios edgellm / llama.cpp; goal: within 5%. Printed ratios, not timed tests.

    python benchmarks/rpc.py [--model qwen2.5-coder-1.5b] [--reps 3] [--threads 2] [--tokens 96]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import tool_paths

from edgellm.commands.bench import run_pp, run_tg
from edgellm.models import resolve
from edgellm.remote.split import SplitScheduler
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.rpc import Endpoint, RpcError, check
from edgellm.runtime.sampling import SamplingParams
from tests.support.server import free_port

STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def lo_tx_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, fields = line.partition(":")
        if name.strip() == "lo":
            return int(fields.split()[8])
    raise RuntimeError("no loopback interface in /proc/net/dev")


@contextmanager
def workers(kind: str, n: int, threads: int, cache: Path | None) -> Iterator[tuple[str, ...]]:
    """n workers on free loopback ports: `edgellm worker` or llama.cpp's `ggml-rpc-server`."""
    procs, endpoints = [], []
    for _ in range(n):
        port = free_port()
        if kind == "edgellm":
            cmd = [sys.executable, "-m", "edgellm.cli", "worker", "--port", str(port), "-t", str(threads),
                   "--cache", str(cache) if cache else "off"]
            env = dict(os.environ)
        else:
            (server,) = tool_paths("ggml-rpc-server")
            cmd = [str(server), "-p", str(port), "-t", str(threads), *(["-c"] if cache else [])]
            env = {**os.environ, **({"LLAMA_CACHE": str(cache)} if cache else {})}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        endpoints.append(f"127.0.0.1:{port}")
    try:
        for e in endpoints:  # ready once it answers the handshake
            deadline = time.monotonic() + 60
            while True:
                try:
                    check(Endpoint("127.0.0.1", int(e.rsplit(":", 1)[1])), timeout=2)
                    break
                except RpcError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        yield tuple(endpoints)
    finally:
        for p in procs:
            p.terminate()
            p.wait()


def ours(model: Path, rpc: tuple[str, ...], threads: int, reps: int) -> dict[str, float]:
    engine = Engine(model, LoadOptions(n_ctx=1024, n_threads=threads, n_gpu_layers=99 if rpc else 0, rpc=rpc))
    rng = random.Random(0)
    run_pp(engine, 16, rng), run_tg(engine, 8, rng)  # warm-up
    pp = statistics.median(run_pp(engine, 512, rng) for _ in range(reps))
    tgs, sent = [], []
    for _ in range(reps):
        before = lo_tx_bytes()
        tgs.append(run_tg(engine, 64, rng))
        sent.append((lo_tx_bytes() - before) / 64)
    engine.close()
    return {"pp": pp, "tg": statistics.median(tgs), "bytes": statistics.median(sent)}


def theirs(bench: Path, model: Path, rpc: tuple[str, ...], threads: int, reps: int) -> dict[str, float]:
    extra = ["--rpc", ",".join(rpc), "-ngl", "99"] if rpc else []
    out = subprocess.run([str(bench), "-m", str(model), "-p", "512", "-n", "0", "-t", str(threads), "-r", str(reps),
                          "-o", "json", *extra], capture_output=True, text=True, check=True)
    pp = float(json.loads(out.stdout)[0]["avg_ts"])
    tgs = []
    for _ in range(reps):
        out = subprocess.run([str(bench), "-m", str(model), "-p", "0", "-n", "64", "-t", str(threads), "-r", "1",
                              "-o", "json", *extra], capture_output=True, text=True, check=True)
        tgs.append(float(json.loads(out.stdout)[0]["avg_ts"]))
    return {"pp": pp, "tg": statistics.median(tgs)}


def our_load_s(model: Path, rpc: tuple[str, ...], threads: int) -> float:
    t0 = time.perf_counter()
    Engine(model, LoadOptions(n_ctx=1024, n_threads=threads, n_gpu_layers=99, rpc=rpc)).close()
    return time.perf_counter() - t0


def llama_bytes_per_token(bench: Path, model: Path, rpc: tuple[str, ...], threads: int) -> float:
    """(bytes of a -n 128 run - bytes of a -n 64 run) / 64: the load's and the warm-up's bytes cancel."""
    def run(n: int) -> int:
        before = lo_tx_bytes()
        subprocess.run([str(bench), "-m", str(model), "-p", "0", "-n", str(n), "-t", str(threads), "-r", "1",
                        "--rpc", ",".join(rpc), "-ngl", "99"], capture_output=True, check=True)
        return lo_tx_bytes() - before
    return (run(128) - run(64)) / 64


def llama_load_s(bench: Path, model: Path, rpc: tuple[str, ...], threads: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(bench), "-m", str(model), "-p", "0", "-n", "1", "-t", str(threads), "-r", "1",
                    "--rpc", ",".join(rpc), "-ngl", "99"], capture_output=True, check=True)
    return time.perf_counter() - t0


def child_cost(model: Path, threads: int, tokens: int, rounds: int) -> tuple[float, float]:
    """(in-process decode t/s, through the supervised child) of the same greedy reply, medians of `rounds`."""
    options = LoadOptions(n_ctx=1024, n_threads=threads)
    greedy = SamplingParams.greedy_params()
    inside, child = [], []
    engine = Engine(model, options)
    prompt = engine.chat_tokens(STORY)
    for i in range(rounds * 2):  # alternating
        if i % 2 == 0:
            engine.reset()
            *_, last = engine.generate(prompt, greedy, max_tokens=tokens)
            inside.append(last.stats.decode_tps)
        else:
            engine.close()  # one copy of the weights at a time, as a user has
            split = SplitScheduler(model, options)
            *_, last = split.generate(prompt, sampling=greedy, max_tokens=tokens)
            split.close()
            child.append(last.stats.decode_tps)
            engine = Engine(model, options)
    engine.close()
    return statistics.median(inside), statistics.median(child)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    a = ap.parse_args()
    model = resolve(a.model)
    (bench,) = tool_paths("llama-bench")
    print(f"{model.name}, {a.threads} threads; pp512 / tg64 t/s, every layer on the workers (-ngl 99)")
    print(f"{'workers':<8} {'edgellm pp':>11} {'llama pp':>9} {'x':>6} {'edgellm tg':>11} {'llama tg':>9} {'x':>6} "
          f"{'bytes/token (ours, llama)':>26}")
    for n in (0, 1, 2):
        with workers("edgellm", n, a.threads, None) as eps:
            o = ours(model, eps, a.threads, a.reps)
        with workers("llama", n, a.threads, None) as eps:
            t = theirs(bench, model, eps, a.threads, a.reps)
            t_bytes = llama_bytes_per_token(bench, model, eps, a.threads) if eps else 0.0
        print(f"{n:<8} {o['pp']:>11.1f} {t['pp']:>9.1f} {o['pp'] / t['pp']:>6.3f} {o['tg']:>11.2f} {t['tg']:>9.2f} "
              f"{o['tg'] / t['tg']:>6.3f} {o['bytes'] if n else 0:>13.0f} {t_bytes:>12.0f}", flush=True)

    print(f"load onto one worker (s, medians of {a.reps}): empty tensor cache, then warm")
    loads: dict[str, tuple[list[float], list[float]]] = {"edgellm": ([], []), "llama": ([], [])}
    for _ in range(a.reps):
        for kind in ("edgellm", "llama"):
            with tempfile.TemporaryDirectory() as cache:
                for warm in (0, 1):  # a new worker each time, the same cache folder
                    with workers(kind, 1, a.threads, Path(cache)) as eps:
                        loads[kind][warm].append(our_load_s(model, eps, a.threads) if kind == "edgellm"
                                                 else llama_load_s(bench, model, eps, a.threads))
    for kind, (cold, warm) in loads.items():
        print(f"  {kind:<8} {statistics.median(cold):>7.2f} {statistics.median(warm):>7.2f}"
              + ("  (edgellm: the engine's load; llama: llama-bench's wall time)" if kind == "llama" else ""),
              flush=True)

    inside, child = child_cost(model, a.threads, a.tokens, a.reps)
    print(f"supervised child: decode {child:.2f} t/s vs {inside:.2f} in-process = {child / inside:.3f}x "
          f"(cost {100 * (1 - child / inside):.1f}% a token; goal < 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
