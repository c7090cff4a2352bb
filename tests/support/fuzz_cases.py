"""Feed mutated GGUFs to `edgellm run` in subprocesses and sort what happened (benchmarks/fuzz.py prints it
for 1,000; tests/test_fuzz.py checks ~100 in CI)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.mutations import DAMAGED_WEIGHTS, mutations

DAMAGED_REFUSAL = "NaN or infinite logits"  # edgellm.runtime.sampling.DamagedLogits


@dataclass
class Outcome:
    crashes: list[str] = field(default_factory=list)  # a signal: SIGSEGV, SIGABRT (a GGML_ASSERT)…
    tracebacks: list[str] = field(default_factory=list)
    unclear: list[str] = field(default_factory=list)  # a refusal that is not one line naming where
    refused: int = 0
    located: int = 0  # refusals that say where: a byte offset, or the sizes that do not add up
    messages: dict[str, int] = field(default_factory=dict)  # refusals by kind (numbers and paths blanked)
    ran: int = 0  # the mutation left a valid file (a changed value), and it loaded
    damaged: int = 0  # files whose weights hold NaN or ±inf: each must be refused for its non-finite logits
    missed: list[str] = field(default_factory=list)  # such files that ran, or were refused for another reason

    def summary(self) -> str:
        return (f"{self.refused} refused in one line ({self.located} saying where), {self.ran} still valid and ran, "
                f"{self.damaged} with NaN or ±inf weights, {len(self.crashes)} crashes, "
                f"{len(self.tracebacks)} tracebacks, {len(self.unclear)} unclear refusals, "
                f"{len(self.missed)} damaged weights not refused")

    @property
    def findings(self) -> list[str]:
        return self.crashes + self.tracebacks + self.unclear + self.missed


def run_one(path: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    # the default decoding path (the model's sampling, --draft auto); only the sampling seed is fixed
    return subprocess.run([sys.executable, "-m", "edgellm.cli", "run", str(path), "Hi", "-n", "2", "--seed", "1",
                           "--ctx", "256"], capture_output=True, text=True, timeout=timeout, env=env)


def fuzz(base: Path, n: int, workdir: Path, seed: int = 0) -> Outcome:
    data = base.read_bytes()
    out = Outcome()
    env = {**os.environ, "EDGELLM_DATA": str(workdir / "data")}
    target = workdir / "mutated.gguf"
    for what, mutated in mutations(data, n, seed):
        target.write_bytes(mutated)
        done = run_one(target, env)
        damaged = what.startswith(DAMAGED_WEIGHTS)  # must be refused: the file loads but its logits are not finite
        out.damaged += damaged
        if done.returncode < 0:
            out.crashes.append(f"{what}: {signal.Signals(-done.returncode).name}")
        elif "Traceback" in done.stderr:
            out.tracebacks.append(f"{what}: {done.stderr.strip().splitlines()[-1]}")
        elif done.returncode == 0:
            if damaged:
                out.missed.append(f"{what}: ran to the end ({done.stdout.strip()[:100]!r})")
            else:
                out.ran += 1
        else:
            lines = done.stderr.strip().splitlines()
            # one line; it names where (a byte offset or a field) or what is missing
            if len(lines) == 1 and lines[0].startswith("edgellm: "):
                if damaged and DAMAGED_REFUSAL not in lines[0]:
                    out.missed.append(f"{what}: refused for another reason: {lines[0][:300]}")
                out.refused += 1
                out.located += bool(re.search(r"at byte \d+|needs? [\d,]+ bytes|only \d+ bytes", lines[0]))
                kind = re.sub(r"\d[\d,]*", "N", lines[0].replace(str(target), "FILE"))
                out.messages[kind] = out.messages.get(kind, 0) + 1
            else:
                out.unclear.append(f"{what}: {done.stderr.strip()[:300]}")
    return out
