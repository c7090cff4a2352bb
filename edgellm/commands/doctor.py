"""`edgellm doctor`: what this machine is, how llama.cpp was built for it, and whether a decode runs.

The decode runs in a subprocess: a build with instructions this CPU lacks (SIGILL) or a broken kernel
(SIGSEGV in AMX) kills that child, and the doctor reports it instead of dying with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgellm import __version__, buildflags
from edgellm.errors import EdgeLLMError
from edgellm.models import DEFAULT_MODEL, models_dir, resolve

SMOKE_TIMEOUT_S = 180


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"model for the test decode (default: {DEFAULT_MODEL})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.startswith("GPU")]


def build_mismatches(flags: set[str], system_info: str) -> list[str]:
    """Instruction sets the build uses that this CPU does not list (each one a crash waiting to happen)."""
    enabled = {part.split("=")[0].strip() for part in system_info.replace("|", "\n").splitlines()
               if part.strip().endswith("= 1")}
    needs = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX512": "avx512f",
             "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
             "AVX_VNNI": "avx_vnni"}
    problems = [f"{name} (this CPU lacks {flag}: Illegal instruction)" for name, flag in needs.items()
                if name in enabled and flag not in flags]
    problems += [f"{name} (llama.cpp's AMX matmul segfaults on the first decode)"
                 for name in ("AMX_INT8", "AMX_BF16") if name in enabled]
    return problems


def smoke_decode(model: Path) -> tuple[bool, str]:
    """Load the model and decode a few tokens in a child process; report how it ended."""
    cmd = [sys.executable, "-m", "edgellm.smoke", str(model)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"the test decode did not finish in {SMOKE_TIMEOUT_S} s"
    if out.returncode < 0:
        sig = signal.Signals(-out.returncode).name
        return False, (f"the llama.cpp build crashed with {sig} on a decode: it does not fit this CPU; "
                       f"rebuild it with: rm -rf {buildflags.cache_dir() / 'wheels'} .venv && make setup")
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"the test decode failed (exit {out.returncode}): {last}"
    return True, out.stdout.strip()


def collect(model_spec: str | None) -> tuple[dict, bool]:
    import psutil

    from edgellm.runtime import backend

    flags = buildflags.cpu_flags()
    expected_key = buildflags.cache_key(buildflags.cmake_args(flags, buildflags.has_cuda()))
    try:
        import llama_cpp

        marker = Path(llama_cpp.__file__).parent / "EDGELLM_BUILD_KEY"
        installed_key = marker.read_text().strip() if marker.exists() else "not built by edgellm"
    except ImportError:
        installed_key = "llama-cpp-python is not installed"
    system_info = backend.system_info()
    mem = psutil.virtual_memory()
    folder = models_dir()
    probe = folder if folder.exists() else Path.home()
    try:
        llama_version = version("llama-cpp-python")
    except PackageNotFoundError:
        llama_version = "missing"
    report = {
        "edgellm": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": f"{psutil.cpu_count(logical=False)} physical, {os.cpu_count()} logical",
        "cpu_flags": " ".join(f for f, _ in buildflags.CPU_OPTIONS if f in flags)
        + (" amx" if any(f.startswith("amx") for f in flags) else ""),
        "llama_cpp_python": llama_version,
        "build_key": f"{installed_key} (expected {expected_key})",
        "llama_cpp_system_info": system_info.strip(),
        "gpu_offload": backend.supports_gpu_offload(),
        "gpus": _gpus() or ["none"],
        "ram": f"{mem.total / 2**30:.1f} GiB total, {mem.available / 2**30:.1f} GiB available",
        "models_dir": str(folder),
        "free_disk": f"{shutil.disk_usage(probe).free / 2**30:.1f} GiB",
    }
    ok = True
    problems = build_mismatches(flags, system_info)
    if problems:
        report["build_problems"] = problems
        ok = False
    try:
        model = resolve(model_spec)
        report["test_model"] = str(model)
        passed, detail = smoke_decode(model)
        report["test_decode"] = ("ok: " if passed else "FAILED: ") + detail
        ok = ok and passed
    except EdgeLLMError as e:
        report["test_decode"] = f"FAILED: {e}"
        ok = False
    return report, ok


def main(a: argparse.Namespace) -> int:
    report, ok = collect(a.model)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            text = ", ".join(value) if isinstance(value, list) else str(value)
            print(f"{key.replace('_', ' '):<{width}}  {text}")
    if not ok:
        print("edgellm: doctor found a problem (see above)", file=sys.stderr)
    return 0 if ok else 1
