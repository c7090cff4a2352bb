#!/usr/bin/env python3
"""What the defaults cost: `edgellm run` with no flags beside `--draft off`, and `edgellm plan`'s prediction.

Each run is a real `edgellm run MODEL PROMPT --ctx C -n N --json` subprocess, as a user types it; its peak
RSS comes from the kernel (wait4's ru_maxrss), its decode speed and drafted tokens from --json. The plan is
`edgellm plan MODEL --ctx C --json` (llama.cpp's dry run). Runs alternate default / --draft off, `--repeat`
times; medians are printed with the ratios.

Goals (issue 18): default within 2% of --draft off in peak RSS and decode speed when nothing is drafted;
the 1.5B's default peak RSS at ctx 4096 <= 0.70x of 1,925,712 KB (wave 2's default); the plan within +-5%
of the default run's peak RSS at ctx 2048-16384.

    python benchmarks/defaults.py [--model qwen2.5-coder-1.5b] [--contexts 2048 4096 8192 16384] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "Count to twenty."
WAVE2_DEFAULT_KB = 1_925_712  # the 1.5B's default peak RSS at ctx 4096 before issue 18 (shared/notes)


def cli(*args: str) -> tuple[dict, int]:
    """(the JSON the command printed last, its peak RSS in KB)."""
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"edgellm {' '.join(args)} failed ({proc.returncode})")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--contexts", nargs="*", type=int, default=[2048, 4096, 8192, 16384])
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(f"{a.model}, `edgellm run {a.model} {PROMPT!r} --ctx C -n {a.n}`; medians of {a.repeat}")
    print(f"{'ctx':>6} {'default RSS':>12} {'off RSS':>10} {'ratio':>6} {'default t/s':>12} {'off t/s':>8} "
          f"{'ratio':>6} {'drafted':>8} {'plan':>10} {'plan err':>9}")
    for n_ctx in a.contexts:
        runs: dict[str, list[tuple[dict, int]]] = {"default": [], "off": []}
        for _ in range(a.repeat):
            for side, extra in (("default", ()), ("off", ("--draft", "off"))):
                runs[side].append(cli("run", a.model, PROMPT, "--ctx", str(n_ctx), "-n", str(a.n), "--json", *extra))
        plan, _ = cli("plan", a.model, "--ctx", str(n_ctx), "--json")
        rss = {s: statistics.median(kb for _, kb in r) for s, r in runs.items()}
        tps = {s: statistics.median(d["stats"]["decode_tps"] for d, _ in r) for s, r in runs.items()}
        drafted = max(d["stats"]["drafted_tokens"] for d, _ in runs["default"])
        predicted_kb = plan["peak_bytes"] / 1024
        print(f"{n_ctx:>6} {rss['default']:>9,.0f} KB {rss['off']:>7,.0f} KB {rss['default'] / rss['off']:>6.3f} "
              f"{tps['default']:>12.2f} {tps['off']:>8.2f} {tps['default'] / tps['off']:>6.3f} {drafted:>8} "
              f"{predicted_kb:>7,.0f} KB {predicted_kb / rss['default'] - 1:>+9.1%}", flush=True)
        if n_ctx == 4096 and a.model == "qwen2.5-coder-1.5b":
            print(f"{'':>6} default at ctx 4096: {rss['default'] / WAVE2_DEFAULT_KB:.3f}x wave 2's "
                  f"{WAVE2_DEFAULT_KB:,} KB (goal <= 0.70)")
        reasons = {d["plan"].get("draft_reason", "") for d, _ in runs["default"]}
        for reason in reasons:
            print(f"{'':>6} {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
