"""atheris harness for the chat-template renderer: any template and message give text or an EdgeLLMError,
within the renderer's time limit.

    python tests/fuzz/fuzz_template.py [-runs=N] [corpus_dir …]
"""

import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from edgellm import chat_template
    from edgellm.errors import EdgeLLMError


def one(data: bytes) -> None:
    """`data`: the template's source, a NUL, then the user message (UTF-8, bad bytes replaced)."""
    source, _, content = data.decode("utf-8", errors="replace").partition("\0")
    with contextlib.suppress(EdgeLLMError):  # a clean refusal; anything else is a finding
        chat_template.render(source, [{"role": "user", "content": content}])


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
