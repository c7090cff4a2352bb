#!/usr/bin/env python3
"""`edgellm serve` under 1, 4 and 8 concurrent streaming clients, in one run, against llama.cpp's `llama-server`.

For each model and each N, rounds alternate (ABAB) between
- `llama-server -m GGUF -np N -c N*2048 -t T --jinja`, built from the same vendored llama.cpp with the same
  CPU flags (llama_tools.py), serving the same GGUF;
- `edgellm serve --model MODEL --parallel N`.
Each round starts the server on a free loopback port, waits until GET /v1/models answers, sends one
unmeasured warm-up request, then N streaming chat completions at once through the `openai` client (greedy,
a different short prompt per client, `--max-tokens` each), and stops the server. Per stream: the time to
the first content token and the tokens/s after it (every stream runs to --max-tokens on both servers, with
`ignore_eos`, unless --natural-length); aggregate: completion tokens of all streams / the wall
time from the first request sent to the last stream done. Prints the medians over rounds of the TTFT p50
and p95 (over the N streams), the per-stream tokens/s (median stream) and the aggregate tokens/s, and the
ratios edgellm / llama-server. Goals: aggregate >= 1.0x at 4 and 8 clients; TTFT p95 <= 1.2x.
Printed ratios, not timed tests. Needs the `openai` package.

    python benchmarks/serve.py [--models smollm2-135m qwen2.5-coder-1.5b] [--clients 1 4 8] [--rounds 3]
                               [--max-tokens 128] [--threads T] [--only llama-server|edgellm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import tool_paths
from present import present_models

from edgellm.runtime.engine import default_threads

SERVERS = ("llama-server", "edgellm")
# one per client: the same kind of request (a short question, an answer of a paragraph or a function)
PROMPTS = [
    "Write a Python function that checks whether a number is prime, and explain how it works.",
    "Explain the difference between a list and a tuple in Python, with examples.",
    "Write a JavaScript function that reverses the words of a sentence, and explain it.",
    "Describe how a hash table works and what happens on a collision.",
    "Write a Python class for a stack with push, pop and peek, and explain each method.",
    "Explain what a race condition is and how a mutex prevents it.",
    "Write a SQL query that finds the ten customers with the highest total order value, and explain it.",
    "Explain how binary search works and why it needs a sorted list.",
]
WARMUP = "Say hello."


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float) -> dict | None:
    """GET url, straight to the loopback server (no proxies); None unless it answers 200 with JSON."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return json.loads(r.read()) if r.status == 200 else None
    except (OSError, ValueError):
        return None  # refused while starting, 503 while loading, a half-written answer


@dataclass
class Server:
    kind: str
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float, want: str | None = None) -> str:
        """Poll GET /v1/models until it lists a model; return the id to ask for: `want` where it is listed (edgellm
        lists every local model), else the first (llama-server lists its one)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            models = get_json(f"{self.base_url}/models", timeout=2)
            if models and models.get("data"):
                ids = [m["id"] for m in models["data"]]
                return want if want in ids else ids[0]
            time.sleep(0.1)
        raise RuntimeError(f"{self.kind} did not answer GET /v1/models in {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to the server's process group (it started a session of its own), then wait; kill after timeout."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if self.proc.returncode in (0, -signal.SIGTERM):  # a crash keeps its log for a look
            self.log.unlink(missing_ok=True)
        else:
            print(f"{self.kind} exited with {self.proc.returncode}; its log: {self.log}", file=sys.stderr)


EDGELLM_EXTRA: list[str] = []  # --edgellm-arg
# every stream runs to --max-tokens on both servers (llama-server's ignore_eos, which edgellm also takes): the
# same work on both sides. Each side samples with its own defaults, so a stream that ends early on one
# side only would make that side's total smaller (edgellm applies the model's repeat penalty; llama-server none)
FIXED_LENGTH = True


def server_command(kind: str, binary: Path | None, name: str, model: Path, n: int, port: int,
                   threads: int | None) -> list[str]:
    if kind == "llama-server":
        assert binary is not None
        return [str(binary), "-m", str(model), "-np", str(n), "-c", str(n * 2048),
                "-t", str(threads or default_threads()), "--jinja", "--no-webui", "--host", "127.0.0.1",
                "--port", str(port)]
    # the same context per slot as llama-server's -c N*2048
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", "--model", name, "--parallel", str(n), "--ctx", "2048",
           "--port", str(port), *EDGELLM_EXTRA]
    return cmd + (["--threads", str(threads)] if threads else [])  # unset: its default, physical cores


@contextmanager
def running(kind: str, binary: Path | None, name: str, model: Path, n: int, threads: int | None,
            start_timeout: float) -> Iterator[tuple[Server, str]]:
    """A started server and the model id it serves; always stopped afterwards."""
    port = free_port()
    fd, log = tempfile.mkstemp(prefix=f"serve-bench-{kind}-", suffix=".log")
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(server_command(kind, binary, name, model, n, port, threads), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(kind, proc, port, Path(log))
    try:
        yield server, server.wait_ready(start_timeout, name)
    finally:
        server.stop()


@dataclass
class Stream:
    sent: float
    first: float | None = None  # first content token
    last: float | None = None  # last content token
    done: float = 0.0
    chunks: int = 0  # chunks with content
    usage: int | None = None  # completion tokens, from the usage chunk

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.chunks

    @property
    def ttft(self) -> float:
        return (self.first or self.done) - self.sent

    @property
    def tps(self) -> float:
        """Tokens/s after the first token."""
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return (self.tokens - 1) / (self.last - self.first)


async def one_stream(client, model: str, prompt: str, max_tokens: int) -> Stream:
    s = Stream(sent=time.perf_counter())
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True} if FIXED_LENGTH else None)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            s.usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content or getattr(choice.delta, "reasoning_content", None):
                s.first = s.first if s.first is not None else now
                s.last = now
                s.chunks += 1
    s.done = time.perf_counter()
    return s


async def clients(base_url: str, model: str, n: int, max_tokens: int) -> tuple[list[Stream], float]:
    """(the N streams, the wall time from the first request sent to the last stream done) after one warm-up."""
    import httpx
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=n + 1, max_keepalive_connections=n + 1)
    async with httpx.AsyncClient(trust_env=False, timeout=httpx.Timeout(600.0), limits=limits) as http:
        client = AsyncOpenAI(base_url=base_url, api_key="none", http_client=http, max_retries=0)
        await one_stream(client, model, WARMUP, 8)
        start = time.perf_counter()
        streams = await asyncio.gather(*(one_stream(client, model, PROMPTS[i % len(PROMPTS)], max_tokens)
                                         for i in range(n)))
        return list(streams), max(s.done for s in streams) - start


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Round:
    ttft_p50: float
    ttft_p95: float
    stream_tps: float
    aggregate_tps: float
    tokens: float  # mean completion tokens per stream

    @classmethod
    def of(cls, streams: list[Stream], wall: float) -> Round:
        ttfts = [s.ttft for s in streams]
        return cls(percentile(ttfts, 0.5), percentile(ttfts, 0.95), statistics.median(s.tps for s in streams),
                   sum(s.tokens for s in streams) / wall, statistics.mean(s.tokens for s in streams))


def median_round(rounds: list[Round]) -> Round:
    return Round(*(statistics.median(getattr(r, f) for r in rounds)
                   for f in ("ttft_p50", "ttft_p95", "stream_tps", "aggregate_tps", "tokens")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-1.5b"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8], metavar="N")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for both servers (default: physical cores, edgellm's default)")
    ap.add_argument("--only", choices=SERVERS, help="run only this server (no ratios)")
    ap.add_argument("--natural-length", action="store_true",
                    help="let each stream end where the model ends it (default: every stream runs to --max-tokens)")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds a server may take to answer")
    ap.add_argument("--edgellm-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for edgellm serve (repeatable), e.g. --edgellm-arg=--draft --edgellm-arg=off")
    a = ap.parse_args()
    EDGELLM_EXTRA.extend(a.edgellm_arg)
    global FIXED_LENGTH
    FIXED_LENGTH = not a.natural_length
    kinds = [a.only] if a.only else list(SERVERS)
    binary = tool_paths("llama-server")[0] if "llama-server" in kinds else None

    print(f"{'model':<20} {'N':>2} {'server':<12} {'TTFT p50':>9} {'TTFT p95':>9} {'stream t/s':>10} "
          f"{'aggr. t/s':>9} {'tokens':>6}   (medians of {a.rounds} rounds; TTFT in ms)", flush=True)
    for name, model in present_models(a.models):
        for n in a.clients:
            results: dict[str, list[Round]] = {k: [] for k in kinds}
            for _ in range(a.rounds):
                for kind in kinds:  # ABAB: one server at a time, alternating, so drift does not land on one side
                    with running(kind, binary, name, model, n, a.threads, a.start_timeout) as (server, served):
                        streams, wall = asyncio.run(clients(server.base_url, served, n, a.max_tokens))
                    results[kind].append(Round.of(streams, wall))
            medians = {k: median_round(v) for k, v in results.items()}
            for kind, m in medians.items():
                print(f"{name:<20} {n:>2} {kind:<12} {m.ttft_p50 * 1e3:>9.0f} {m.ttft_p95 * 1e3:>9.0f} "
                      f"{m.stream_tps:>10.1f} {m.aggregate_tps:>9.1f} {m.tokens:>6.0f}", flush=True)
            if len(medians) == 2:
                ours, theirs = medians["edgellm"], medians["llama-server"]
                aggr, ttft = ours.aggregate_tps / theirs.aggregate_tps, ours.ttft_p95 / theirs.ttft_p95
                goal = "goal >= 1.0x" if n >= 4 else "no goal at N < 4"
                print(f"{'':<20} {n:>2} edgellm / llama-server: aggregate {aggr:.2f}x ({goal}), "
                      f"TTFT p95 {ttft:.2f}x (goal <= 1.2x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
