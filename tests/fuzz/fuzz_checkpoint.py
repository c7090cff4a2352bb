"""atheris harness for the converter's checks of a Hugging Face folder: config.json and the safetensors
header (the conversion plan: names, shapes, dtypes against config.json); any bytes give a plan or an
EdgeLLMError.

    python tests/fuzz/fuzz_checkpoint.py [-runs=N] [corpus_dir …]
"""

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from edgellm.errors import EdgeLLMError
    from edgellm.quantize.convert import load_config, plan

FOLDER = Path(tempfile.mkdtemp())


def one(data: bytes) -> None:
    """`data`: a 4-byte little-endian length, that many bytes of config.json, then model.safetensors."""
    n = int.from_bytes(data[:4], "little")
    (FOLDER / "config.json").write_bytes(data[4:4 + n])
    (FOLDER / "model.safetensors").write_bytes(data[4 + n:])
    try:
        config, arch = load_config(FOLDER)
        plan(FOLDER, config, arch, "f16")  # every tensor checked against the config's shapes
    except EdgeLLMError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
