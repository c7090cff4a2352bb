#!/usr/bin/env python3
"""Quantization quality, measured in one run: no importance matrix, ours, and llama-imatrix's.

A real-weight HF folder is exported from a dev GGUF (default SmolLM2-135M), dithered (`--dither`,
Gaussian noise of 0.1 x each row's spread: a dequantized GGUF sits on its quantization grid, which a
finer type of the same family can hold exactly; the noise leaves every type the error it has on a
trained checkpoint), and converted to F16. The
importance matrices are computed from the same calibration text (assets/calibration.txt) with the
same chunking; each quantized model is compared with the F16 on held-out text (assets/heldout.txt):
mean KL divergence, same-top-1 rate, perplexity. Then the size budget: for each type, `--size` set to
the size of llama.cpp's mix made with llama-imatrix's matrix, and the ratio of the mean KLDs (goal:
at most 0.8).

    python benchmarks/quant_quality.py [--model smollm2-135m] [--types Q4_K_M,Q3_K_M] [--chunks 32]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import tool_paths

from edgellm.models import resolve
from edgellm.quantize.budget import plan
from edgellm.quantize.convert import convert
from edgellm.quantize.export import export
from edgellm.quantize.imatrix import CALIBRATION, ImportanceMatrix, compute
from edgellm.quantize.quantize import quantize
from edgellm.quantize.report import measure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dither", type=float, default=0.1, help="noise added to the export (0: none)")
    a = ap.parse_args()
    (llama_imatrix,) = tool_paths("llama-imatrix")
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        tmp = Path(tmp)
        f16 = convert(export(resolve(a.model), tmp / "hf", dither=a.dither), tmp / "f16.gguf")
        ours = compute(f16, max_chunks=a.chunks, threads=a.threads)
        theirs_path = tmp / "llama.imatrix.gguf"
        subprocess.run([str(llama_imatrix), "-m", str(f16), "-f", str(CALIBRATION), "-c", "512", "--chunks",
                        str(a.chunks), "-t", str(a.threads), "-o", str(theirs_path)],
                       check=True, capture_output=True)
        theirs = ImportanceMatrix.load(theirs_path)
        print(f"{a.model} (dither {a.dither}): importance matrices from {ours.chunks} chunks of 512 tokens; "
              f"llama-imatrix's has {len(theirs.sums)} tensors, ours {len(ours.sums)}")
        print(f"{'type':<8}{'imatrix':<14}{'size MB':>9}{'mean KLD':>10}{'top-1':>8}{'PPL':>8}")
        fixed = {}
        for qtype in a.types.split(","):
            for label, im in (("none", None), ("llama-imatrix", theirs), ("edgellm", ours)):
                out = quantize(f16, tmp / f"{qtype}-{label}.gguf", qtype, a.threads, im)
                q = measure(f16, out, threads=a.threads)
                fixed[qtype, label] = q
                print(f"{qtype:<8}{label:<14}{q.size_bytes / 1e6:>9.1f}{q.mean_kld:>10.4f}{q.same_top1:>8.1%}"
                      f"{q.ppl_quantized:>8.3f}", flush=True)
        print("size budget (edgellm --size, its own importance matrix) against llama.cpp's mix of that size")
        for qtype in a.types.split(","):
            mix = fixed[qtype, "llama-imatrix"]
            started = time.perf_counter()
            p = plan(f16, ours, size_bytes=mix.size_bytes, threads=a.threads)
            seconds = time.perf_counter() - started
            out = quantize(f16, tmp / f"budget-{qtype}.gguf", p.file_type(), a.threads, ours,
                           tensor_types=p.overrides())
            q = measure(f16, out, threads=a.threads)
            print(f"--size {mix.size_bytes}: {q.size_bytes / 1e6:.1f} MB, mean KLD {q.mean_kld:.4f}, top-1 "
                  f"{q.same_top1:.1%}, PPL {q.ppl_quantized:.3f}; {qtype}+llama-imatrix {mix.mean_kld:.4f}: "
                  f"ratio {q.mean_kld / mix.mean_kld:.2f} (plan {seconds:.0f} s: {p.describe()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
