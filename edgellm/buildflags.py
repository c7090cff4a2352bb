"""Which llama.cpp build fits this machine: CPU flags -> CMake options -> cache key.

Standard library only: `scripts/build_llama.py` imports it before anything is installed, and
`edgellm doctor` uses it to compare the installed build with the CPU.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"
# /proc/cpuinfo flag -> ggml CMake option. AMX is left out on purpose (see the docstring).
CPU_OPTIONS = [
    ("avx", "GGML_AVX"),
    ("avx2", "GGML_AVX2"),
    ("fma", "GGML_FMA"),
    ("f16c", "GGML_F16C"),
    ("bmi2", "GGML_BMI2"),
    ("avx_vnni", "GGML_AVX_VNNI"),
    ("avx512f", "GGML_AVX512"),
    ("avx512vbmi", "GGML_AVX512_VBMI"),
    ("avx512_vnni", "GGML_AVX512_VNNI"),
    ("avx512_bf16", "GGML_AVX512_BF16"),
]
ALWAYS_OFF = ["GGML_NATIVE", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "LLAVA_BUILD"]


def cache_dir() -> Path:
    root = os.environ.get("EDGELLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgellm")
    return Path(root)


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def has_cuda() -> bool:
    if os.environ.get("EDGELLM_NO_CUDA"):
        return False
    if not shutil.which("nvcc"):
        return False
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def cmake_args(flags: set[str], cuda: bool) -> list[str]:
    args = [f"-D{opt}=OFF" for opt in ALWAYS_OFF]
    for flag, option in CPU_OPTIONS:
        args.append(f"-D{option}={'ON' if flag in flags else 'OFF'}")
    if cuda:
        args.append("-DGGML_CUDA=ON")
    # llama.cpp's RPC backend: `edgellm worker` serves it and `--rpc` places layers on workers
    args.append("-DGGML_RPC=ON")
    args += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
             "-DLLAMA_BUILD_SERVER=OFF"]
    return args


def cache_key(args: list[str]) -> str:
    text = "\n".join([VERSION, sys.implementation.cache_tag, *args])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
