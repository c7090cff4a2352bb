"""atheris (libFuzzer) harness for the GGUF header reader: any input gives a ModelInfo or an EdgeLLMError.

    python tests/fuzz/fuzz_gguf.py [-runs=N] [-max_len=N] [corpus_dir …]
"""

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from edgellm.errors import EdgeLLMError
    from edgellm.gguf_info import read_info

SCRATCH = Path(tempfile.mkdtemp()) / "fuzz.gguf"


def one(data: bytes) -> None:
    SCRATCH.write_bytes(data)
    try:
        info = read_info(SCRATCH)
    except EdgeLLMError:
        return
    info.arch, info.n_layer, info.n_ctx_train, info.chat_template  # the properties the app reads  # noqa: B018


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
