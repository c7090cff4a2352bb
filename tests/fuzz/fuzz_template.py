"""atheris harness for the chat-template renderer: any template and message give text or an EdgeLLMError of
one line naming the template's line, within the renderer's time limit.

    python tests/fuzz/fuzz_template.py [-runs=N] [-seed=N] [corpus_dir …]
"""

import re
import sys

import atheris

with atheris.instrument_imports():
    from edgellm import chat_template
    from edgellm.errors import EdgeLLMError

REFUSAL = re.compile(r"the model's chat template failed at line \d+: [^\n]+")


def one(data: bytes) -> None:
    """`data`: the template's source, a NUL, then the user message (UTF-8, bad bytes replaced)."""
    source, _, content = data.decode("utf-8", errors="replace").partition("\0")
    try:
        chat_template.render(source, [{"role": "user", "content": content}])
    except EdgeLLMError as e:  # a clean refusal; anything else (or a refusal of another form) is a finding
        if type(e) is not EdgeLLMError or not REFUSAL.fullmatch(str(e)):
            raise AssertionError(f"unclear refusal: {e!r}") from None


if __name__ == "__main__":
    atheris.Setup(sys.argv, one)
    atheris.Fuzz()
