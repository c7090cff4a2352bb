#!/usr/bin/env python3
"""1,000 structured mutations of a real GGUF fed to `edgellm run` in subprocesses (tests/support/mutations.py:
truncation at every section boundary, bit flips in counts/lengths/types/offsets/dims, huge counts, absurd
dimensions, misaligned, overlapping and out-of-file tensor data, bad UTF-8, wrong value types, NaN and ±inf
weights), on the default decoding path with a fixed sampling seed.

Goal: 0 crashes (no signal, no abort), 0 tracebacks, every refusal one line, every file with NaN or ±inf
weights refused for its non-finite logits; a mutation that leaves a valid file may load and run. The base is a
tiny real model converted by our converter (5 MB, SmolLM2's vocabulary), or --model.

    python benchmarks/fuzz.py [-n 1000] [--seed 0] [--model PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgellm.models import resolve
from edgellm.quantize.convert import convert
from edgellm.quantize.export import export
from tests.support.fuzz_cases import fuzz
from tests.test_quantize import tiny_checkpoint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None, help="the GGUF to mutate (default: a tiny converted one)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = a.model
        if base is None:
            hf = export(resolve("smollm2-135m"), work / "hf" / "SmolLM2")
            base = convert(tiny_checkpoint(work / "Tiny", "LlamaForCausalLM", hf), work / "tiny.gguf", "q8_0")
        t0 = time.perf_counter()
        outcome = fuzz(base, a.n, work, a.seed)
        print(f"{a.n} mutations of {base.name} ({base.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s: "
              f"{outcome.summary()}")
        for line in outcome.findings:
            print("  ", line)
        print("refusals by kind:")
        for kind, count in sorted(outcome.messages.items(), key=lambda kv: -kv[1]):
            print(f"  {count:4d}  {kind}")
    return 0 if not outcome.findings else 1


if __name__ == "__main__":
    sys.exit(main())
