#!/usr/bin/env python3
"""Build llama.cpp's own tools (llama-bench, …) from the sources vendored in the llama-cpp-python sdist.

The baselines our benchmarks compare against must be the same llama.cpp, built with the same CPU flags
as our wheel (edgellm/buildflags.py). Binaries are cached in ~/.cache/edgellm/tools/<key>/bin.

    python benchmarks/llama_tools.py llama-bench [llama-server …]   # prints the binary paths
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from edgellm.buildflags import VERSION, cache_dir, cache_key, cmake_args, cpu_flags, has_cuda


def sdist_dir() -> Path:
    """The unpacked llama-cpp-python sdist (downloaded once with pip)."""
    root = cache_dir() / "src"
    src = root / f"llama_cpp_python-{VERSION}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        return src
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                        ":all:", "-d", tmp, f"llama-cpp-python=={VERSION}"], check=True)
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        (Path(tmp) / src.name).replace(src)
    return src


# llama-server's embedded web UI: neither built with npm nor downloaded at build time (an empty asset table)
SERVER_ARGS = ["-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF"]


def tool_paths(*targets: str) -> list[Path]:
    """Paths of llama.cpp tools (llama-bench, llama-server, …), built once per llama.cpp version and CPU flags."""
    args = [a for a in cmake_args(cpu_flags(), has_cuda()) if "BUILD_TOOLS" not in a]
    # the key is the one from before llama-server (cmake_args' -DLLAMA_BUILD_SERVER=OFF is in it): turning the
    # server on below only adds targets, so the binaries already cached under the key stay valid
    key = cache_key(args)
    tools = cache_dir() / "tools" / key
    bin_dir = tools / "bin"
    if all((bin_dir / t).exists() for t in targets):
        return [bin_dir / t for t in targets]
    tools.mkdir(parents=True, exist_ok=True)
    with open(tools / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time in the shared build folder
        missing = [t for t in targets if not (bin_dir / t).exists()]
        if missing:
            src = sdist_dir() / "vendor" / "llama.cpp"
            build = tools / "build"
            subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                            "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TOOLS=ON", *SERVER_ARGS,
                            *(a for a in args if "BUILD_SERVER" not in a)], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2),
                            "--target", *missing], check=True)
            bin_dir.mkdir(parents=True, exist_ok=True)
            for t in missing:
                (build / "bin" / t).replace(bin_dir / t)
    return [bin_dir / t for t in targets]


# what llama.cpp's convert_hf_to_gguf.py needs (its requirements file pins transformers 4.57.6)
REFERENCE_REQUIREMENTS = ["torch==2.13.0", "transformers==4.57.6", "sentencepiece", "protobuf>=4.21,<5", "numpy"]


def reference_converter() -> tuple[Path, Path]:
    """(python, convert_hf_to_gguf.py): llama.cpp's own converter in a cached venv of its own."""
    script = sdist_dir() / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    venv = cache_dir() / "reference-venv"
    python = venv / "bin" / "python"
    stamp = venv / "requirements.txt"
    if not (python.exists() and stamp.exists() and stamp.read_text() == "\n".join(REFERENCE_REQUIREMENTS)):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *REFERENCE_REQUIREMENTS], check=True)
        stamp.write_text("\n".join(REFERENCE_REQUIREMENTS))
    return python, script


if __name__ == "__main__":
    for path in tool_paths(*(sys.argv[1:] or ["llama-bench"])):
        print(path)
