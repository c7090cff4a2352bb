#!/usr/bin/env python3
"""Build llama-cpp-python from source for the CPU at hand and install it, with a wheel cache.

Why: a `GGML_NATIVE=ON` build segfaults in the AMX matmul on Sapphire Rapids, and turning on an
instruction set the CPU lacks (AVX-VNNI on AMD EPYC) dies with SIGILL. So we build with
`GGML_NATIVE=OFF` and exactly the `GGML_AVX*` options that /proc/cpuinfo lists, never AMX, CUDA when
nvcc and an NVIDIA GPU are present. The wheel is cached outside the clone, keyed by that set.

    python scripts/build_llama.py            # build if needed, then pip install the cached wheel
    python scripts/build_llama.py --print    # show the flags and the cache key
Standard library only: it runs before anything else is installed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgellm.buildflags import (
    VERSION,
    cache_dir,
    cache_key,
    cmake_args,
    cpu_flags,
    has_cuda,
)


def build_wheel(args: list[str], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(args),
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2), FORCE_CMAKE="1")
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        print(f"edgellm: building llama-cpp-python {VERSION} from source ({' '.join(args)})",
              flush=True)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-binary",
                        "llama-cpp-python", "--no-cache-dir", "-w", tmp,
                        f"llama-cpp-python=={VERSION}"], env=env, check=True)
        (wheel,) = Path(tmp).glob("llama_cpp_python-*.whl")
        final = dest / wheel.name
        wheel.replace(final)  # atomic: a half-built wheel never lands in the cache
    return final


def installed_key() -> str | None:
    try:
        from importlib.metadata import distribution
        dist = distribution("llama-cpp-python")
    except Exception:
        return None
    marker = Path(dist.locate_file("llama_cpp")) / "EDGELLM_BUILD_KEY"
    return marker.read_text().strip() if marker.exists() else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--print", action="store_true", help="print flags and cache key, build nothing")
    ap.add_argument("--wheel-only", action="store_true", help="build/cache the wheel, do not install")
    a = ap.parse_args()

    cuda = has_cuda()
    args = cmake_args(cpu_flags(), cuda)
    key = cache_key(args)
    wheel_dir = cache_dir() / "wheels" / key
    if a.print:
        print(f"key {key}\ncuda {cuda}\ncmake {' '.join(args)}\nwheels {wheel_dir}")
        return 0
    if not a.wheel_only and installed_key() == key:
        print(f"edgellm: llama-cpp-python {VERSION} already installed for this CPU ({key})")
        return 0
    wheels = sorted(wheel_dir.glob("llama_cpp_python-*.whl"))
    wheel = wheels[-1] if wheels else build_wheel(args, wheel_dir)
    print(f"edgellm: wheel {wheel}")
    if a.wheel_only:
        return 0
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps",
                    str(wheel)], check=True)
    from importlib.metadata import distribution
    marker = Path(distribution("llama-cpp-python").locate_file("llama_cpp")) / "EDGELLM_BUILD_KEY"
    marker.write_text(key + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
