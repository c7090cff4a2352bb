#!/usr/bin/env python3
"""`edgellm quantize` against llama.cpp's convert_hf_to_gguf.py + llama-quantize, in one run.

A real-weight checkpoint is made by exporting a dev GGUF (default Qwen2.5-Coder-0.5B) to an HF folder.
Each step runs in its own process under GNU time: wall seconds and peak RSS. Two comparisons: without
an importance matrix (convert_hf_to_gguf.py + llama-quantize against `edgellm quantize --no-imatrix`),
and with one from the same calibration text and chunk count (+ llama-imatrix against the default).
The comparison without an importance matrix is repeated on the same weights saved in F32 (`--no-f32`
skips it): an F32 checkpoint is twice the bytes to read and convert.

    python benchmarks/quantize.py [--model qwen2.5-coder-0.5b] [--type Q4_K_M]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import reference_converter, tool_paths

from edgellm.models import resolve
from edgellm.quantize.export import export
from edgellm.quantize.imatrix import CALIBRATION


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one command."""
    with tempfile.NamedTemporaryFile("r") as report:
        out = subprocess.run(["/usr/bin/time", "-o", report.name, "-f", "%e %M", *cmd], capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
        seconds, kb = report.read().split()
    return float(seconds), int(kb) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--chunks", type=int, default=32, help="512-token chunks for the importance matrices")
    ap.add_argument("--no-f32", action="store_true", help="skip the F32 checkpoint case")
    a = ap.parse_args()
    python, script = reference_converter()
    llama_quantize, llama_imatrix = tool_paths("llama-quantize", "llama-imatrix")
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        hf = export(resolve(a.model), Path(tmp) / "hf")
        f16, im, ref_q, ref_qi, ours, ours_i = (Path(tmp) / n for n in (
            "ref-f16.gguf", "ref.imatrix.gguf", "ref-q.gguf", "ref-qi.gguf", "ours.gguf", "ours-i.gguf"))
        conv = timed([str(python), str(script), str(hf), "--outtype", "f16", "--outfile", str(f16)])
        quant = timed([str(llama_quantize), str(f16), str(ref_q), a.type, "2"])
        imat = timed([str(llama_imatrix), "-m", str(f16), "-f", str(CALIBRATION), "-c", "512", "--chunks",
                      str(a.chunks), "-t", "2", "-o", str(im)])
        quant_i = timed([str(llama_quantize), "--imatrix", str(im), str(f16), str(ref_qi), a.type, "2"])
        edgellm = [sys.executable, "-m", "edgellm.cli", "quantize", str(hf), "--type", a.type, "--no-report",
                   "-t", "2", "--imatrix-chunks", str(a.chunks)]
        plain = timed([*edgellm, "--no-imatrix", "-o", str(ours)])
        guided = timed([*edgellm, "-o", str(ours_i)])
        print(f"{a.model} -> {a.type}")
        rows = [("llama.cpp convert_hf_to_gguf.py (F16)", conv), ("llama.cpp llama-quantize", quant),
                ("llama.cpp llama-imatrix", imat), ("llama.cpp llama-quantize --imatrix", quant_i)]
        for label, (t, m) in rows:
            print(f"{label:<44}{t:6.1f} s  peak {m:.2f} GB")
        for label, steps, (t, m), out, ref in (
                ("no importance matrix", (conv, quant), plain, ours, ref_q),
                ("with importance matrix", (conv, imat, quant_i), guided, ours_i, ref_qi)):
            t_ref, m_ref = sum(s[0] for s in steps), max(s[1] for s in steps)
            print(f"{label}: llama.cpp {t_ref:.1f} s, peak {m_ref:.2f} GB; edgellm quantize (one command) "
                  f"{t:.1f} s, peak {m:.2f} GB; time ratio {t / t_ref:.2f}, memory ratio {m / m_ref:.2f}; "
                  f"sizes {out.stat().st_size / 1e6:.1f} MB vs {ref.stat().st_size / 1e6:.1f} MB")
        if a.no_f32:
            return 0
        shutil.rmtree(hf)
        hf32 = export(resolve(a.model), Path(tmp) / "hf32", dtype="float32")
        f16.unlink()
        conv32 = timed([str(python), str(script), str(hf32), "--outtype", "f16", "--outfile", str(f16)])
        quant32 = timed([str(llama_quantize), str(f16), str(ref_q), a.type, "2"])
        ours.unlink()
        plain32 = timed([*edgellm[:4], str(hf32), *edgellm[5:], "--no-imatrix", "-o", str(ours)])
        t_ref, m_ref = conv32[0] + quant32[0], max(conv32[1], quant32[1])
        print(f"F32 checkpoint, no importance matrix: llama.cpp {t_ref:.1f} s, peak {m_ref:.2f} GB "
              f"(convert {conv32[1]:.2f}, quantize {quant32[1]:.2f}); edgellm quantize {plain32[0]:.1f} s, "
              f"peak {plain32[1]:.2f} GB; time ratio {plain32[0] / t_ref:.2f}, memory ratio {plain32[1] / m_ref:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
