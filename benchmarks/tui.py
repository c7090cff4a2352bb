#!/usr/bin/env python3
"""Reply speed in the chat app against `edgellm run`: same model, prompt and settings, in one run.

The app runs for real: `edgellm chat`'s ChatApp on a real terminal (tmux), typed into by Textual's
auto-pilot; the reply's decode tokens/s is what its status line shows. `edgellm run --json` gives the
baseline. Runs alternate; it prints the ratio of the medians and the median of the per-pair ratios (each
pair runs back to back, so it is less moved by the machine's drift).

Also: the time from launch to the app's first frame on the terminal (goal < 1 s; the model loads behind
it) and the echo latency of keystrokes typed while a reply streams at full speed (goal p95 < 50 ms).

    python benchmarks/tui.py [--model smollm2-135m] [-n 256] [--repeat 3] [--keys 40]
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
    """The same flags on both sides, and no others: the model's sampling defaults and --draft auto."""
    return [model, "-n", str(n)]


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
    from edgellm.cli import command_parser
    from edgellm.gguf_info import read_info
    from edgellm.models import resolve
    from edgellm.options import planned_load, sampling_defaults
    from edgellm.tui.app import ChatApp
    from edgellm.tui.history import History
    from edgellm.tui.settings import ChatSettings
    from edgellm.tui.widgets import PromptArea

    parser, _ = command_parser("chat")
    a = parser.parse_args(settings(model, n))
    path = resolve(a.model)
    info = read_info(path)
    defaults = sampling_defaults(a, info)
    planned = planned_load(a, info)
    app = ChatApp(model=path, options=planned.options, defaults=defaults, history=History(out.with_suffix(".sqlite")),
                  settings=ChatSettings.from_sampling(defaults.sampling, defaults.system, n, a.draft))
    if fps:
        app.chat.frame_s = 1 / fps

    async def pilot(p) -> None:
        while app.chat.query_one(PromptArea).disabled:
            await p.pause(0.05)
        app.chat.query_one(PromptArea).text = PROMPT
        app.chat.query_one(PromptArea).focus()
        await p.press("enter")
        while app.chat.last_record is None:  # a plain sleep: pilot.pause would make the app do work
            await asyncio.sleep(0.25)
        out.write_text(json.dumps(app.chat.last_record.stats.as_dict()))
        app.exit()

    app.run(auto_pilot=pilot)


def chat_in_tmux(session: str, model: str, n: int, data: Path) -> None:
    cmd = (f"env EDGELLM_DATA={data} {sys.executable} -m edgellm.cli chat {' '.join(settings(model, n))}")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "100", "-y", "30", cmd], check=True)


def screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def first_frame_s(model: str, data: Path) -> tuple[float, float]:
    """(launch -> the first frame of the app on the terminal, launch -> the model loaded and the box open)."""
    session = f"edgellm-frame-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    chat_in_tmux(session, model, 16, data)
    first = ready = None
    try:
        while ready is None and time.perf_counter() - t0 < 60:
            shown = screen(session)
            if first is None and "edgellm chat" in shown:
                first = time.perf_counter() - t0
            if "ready" in shown:
                ready = time.perf_counter() - t0
            time.sleep(0.005)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    if first is None or ready is None:
        raise SystemExit("the app did not show its first frame in 60 s")
    return first, ready


def echo_latencies_ms(model: str, data: Path, keys: int) -> list[float]:
    """Keystrokes typed into the message box while a reply streams at full speed: time until each shows."""
    session = f"edgellm-echo-{time.monotonic_ns()}"
    chat_in_tmux(session, model, 100000, data)
    try:
        while "ready" not in screen(session):
            time.sleep(0.05)
        subprocess.run(["tmux", "send-keys", "-t", session, "-l", PROMPT], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "Enter"], check=True)
        while "thinking" in screen(session) or "assistant" not in screen(session):
            time.sleep(0.02)
        time.sleep(1.0)  # streaming at full speed
        out = []
        for i in range(keys):
            t0 = time.perf_counter()
            subprocess.run(["tmux", "send-keys", "-t", session, "-l", "§"], check=True)
            while screen(session).count("§") <= i:
                if time.perf_counter() - t0 > 5:
                    raise SystemExit("a keystroke did not show in 5 s")
            out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.05)
        if "t/s" in screen(session).splitlines()[-6]:
            print("warning: the reply ended before the last keystroke")
        return out
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-n", type=int, default=256, help="most tokens in the reply")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fps", type=float, default=0, help="frames per second of the reply (default: the app's)")
    ap.add_argument("--keys", type=int, default=40, help="keystrokes timed while a reply streams")
    ap.add_argument("--inner", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        inner(a.inner, a.model, a.n, a.fps)
        return 0
    if shutil.which("tmux") is None:
        raise SystemExit("tmux is needed: apt-get install tmux")
    with tempfile.TemporaryDirectory() as tmp:
        frames = [first_frame_s(a.model, Path(tmp) / f"frame-{i}") for i in range(a.repeat + 2)]
        firsts, readies = sorted(f for f, _ in frames), sorted(r for _, r in frames)
        print(f"launch to first frame: median {statistics.median(firsts) * 1000:.0f} ms "
              f"(range {firsts[0] * 1000:.0f}-{firsts[-1] * 1000:.0f}; goal < 1000); to the model loaded: "
              f"median {statistics.median(readies) * 1000:.0f} ms", flush=True)
        echo = sorted(echo_latencies_ms(a.model, Path(tmp) / "echo", a.keys))
        p95 = echo[min(len(echo) - 1, round(0.95 * (len(echo) - 1)))]
        print(f"keystroke echo while a reply streams: median {statistics.median(echo):.0f} ms, p95 {p95:.0f} ms, "
              f"max {echo[-1]:.0f} ms over {len(echo)} keys (goal p95 < 50; tmux's capture-pane polling included)",
              flush=True)
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
