#!/usr/bin/env python3
"""Reply speed in the chat app against `edgellm run`: same model, prompt and settings, in one run.

The app runs for real: `edgellm chat`'s ChatApp on a real terminal (tmux), typed into by Textual's
auto-pilot; the reply's decode tokens/s is what its status line shows. `edgellm run --json` gives the
baseline. Runs alternate; it prints the ratio of the medians and the median of the per-pair ratios (each
pair runs back to back, so it is less moved by the machine's drift).

    python benchmarks/tui.py [--model smollm2-135m] [-n 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def settings(model: str, n: int) -> list[str]:
    return [model, "--temp", "0", "-n", str(n)]


def run_baseline(model: str, n: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "edgellm.cli", "run", *settings(model, n), PROMPT, "--json"],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["stats"]


def run_app(model: str, n: int, out: Path, fps: float) -> dict:
    """The app on a real terminal in tmux; the inner process writes the last reply's stats to `out`."""
    session = f"edgellm-bench-{time.monotonic_ns()}"
    cmd = f"{sys.executable} {Path(__file__).resolve()} --inner {out} --model {model} -n {n} --fps {fps}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd], check=True)
    try:
        for _ in range(1200):
            if out.exists() and out.stat().st_size:
                return json.loads(out.read_text())
            time.sleep(0.1)
        raise SystemExit("the app did not finish its reply in 120 s")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def inner(out: Path, model: str, n: int, fps: float) -> None:
    from textual.widgets import Input

    from edgellm.cli import command_parser
    from edgellm.gguf_info import read_info
    from edgellm.models import resolve
    from edgellm.options import planned_load, sampling_defaults
    from edgellm.tui.app import ChatApp

    parser, _ = command_parser("chat")
    a = parser.parse_args(settings(model, n))
    path = resolve(a.model)
    info = read_info(path)
    defaults = sampling_defaults(a, info)
    app = ChatApp(model=path, options=planned_load(a, info).options, defaults=defaults, session_args={
        "sampling": defaults.sampling, "max_tokens": n, "system": defaults.system})
    if fps:
        app.frame_s = 1 / fps

    async def pilot(p) -> None:
        while app.query_one("#prompt", Input).disabled:
            await p.pause(0.05)
        app.query_one("#prompt", Input).value = PROMPT
        await p.press("enter")
        while app.last_record is None:  # a plain sleep: pilot.pause would make the app do work
            await asyncio.sleep(0.25)
        out.write_text(json.dumps(app.last_record.stats.as_dict()))
        app.exit()

    app.run(auto_pilot=pilot)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-n", type=int, default=256, help="most tokens in the reply")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fps", type=float, default=0, help="frames per second of the reply (default: the app's)")
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        inner(a.inner, a.model, a.n, a.fps)
        return 0
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed: apt-get install tmux")
    base, tui = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeat):
            b = run_baseline(a.model, a.n)
            t = run_app(a.model, a.n, Path(tmp) / f"app-{i}.json", a.fps)
            base.append(b["decode_tps"])
            tui.append(t["decode_tps"])
            print(f"run {i + 1}: edgellm run {b['decode_tps']:.1f} t/s ({b['generated_tokens']} tokens), "
                  f"chat app {t['decode_tps']:.1f} t/s ({t['generated_tokens']} tokens)")
    ratio = statistics.median(tui) / statistics.median(base)
    pairs = sorted(t / b for t, b in zip(tui, base, strict=True))
    print(f"{a.model}, {a.n} tokens, greedy: chat app / edgellm run = {ratio:.3f} "
          f"(medians {statistics.median(tui):.1f} / {statistics.median(base):.1f} t/s); per pair: median "
          f"{statistics.median(pairs):.3f}, range {pairs[0]:.3f}-{pairs[-1]:.3f}; goal >= 0.95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
