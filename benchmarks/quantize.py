#!/usr/bin/env python3
"""`edgellm quantize` against llama.cpp's convert_hf_to_gguf.py + llama-quantize, in one run.

A real-weight checkpoint is made by exporting a dev GGUF (default Qwen2.5-Coder-0.5B) to an HF folder.
Each step runs in its own process under GNU time: wall seconds and peak RSS.

    python benchmarks/quantize.py [--model qwen2.5-coder-0.5b] [--type Q4_K_M]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_tools import reference_converter, tool_paths

from edgellm.models import resolve
from edgellm.quantize.export import export


def timed(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one command."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    seconds, kb = out.stderr.strip().splitlines()[-1].split()
    return float(seconds), int(kb) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--type", default="Q4_K_M")
    a = ap.parse_args()
    python, script = reference_converter()
    (llama_quantize,) = tool_paths("llama-quantize")
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        hf = export(resolve(a.model), Path(tmp) / "hf")
        ref_f16, ref_q, ours = (Path(tmp) / n for n in ("ref-f16.gguf", "ref-q.gguf", "ours.gguf"))
        t_conv, m_conv = timed([str(python), str(script), str(hf), "--outtype", "f16", "--outfile", str(ref_f16)])
        t_quant, m_quant = timed([str(llama_quantize), str(ref_f16), str(ref_q), a.type, "2"])
        t_ours, m_ours = timed([sys.executable, "-m", "edgellm.cli", "quantize", str(hf), "--type", a.type,
                                "-o", str(ours), "--no-report", "-t", "2"])
        print(f"{a.model} -> {a.type}")
        print(f"llama.cpp convert_hf_to_gguf.py (F16)  {t_conv:6.1f} s  peak {m_conv:.2f} GB")
        print(f"llama.cpp llama-quantize               {t_quant:6.1f} s  peak {m_quant:.2f} GB")
        print(f"llama.cpp total                        {t_conv + t_quant:6.1f} s  peak {max(m_conv, m_quant):.2f} GB")
        print(f"edgellm quantize (one command)         {t_ours:6.1f} s  peak {m_ours:.2f} GB")
        print(f"time ratio {t_ours / (t_conv + t_quant):.2f}, memory ratio {m_ours / max(m_conv, m_quant):.2f}; "
              f"output sizes {ours.stat().st_size / 1e6:.1f} MB vs {ref_q.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
