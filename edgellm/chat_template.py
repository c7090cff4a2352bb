"""Render a model's chat template (from GGUF metadata) in jinja2's sandbox, the way transformers does."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from edgellm.errors import EdgeLLMError

# llama.cpp falls back to ChatML when a GGUF carries no template; so do we.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


RENDER_SECONDS = 2.0  # a template that takes longer is looping: real ones take well under 10 ms
RENDER_CHARS = 4_000_000  # a prompt longer than this is not a chat turn (a 128k context is ~500k chars)
_limits = threading.local()


class _Limited(ImmutableSandboxedEnvironment):
    """The sandbox, plus limits on time and size: a GGUF's template is untrusted code.

    Every call (range(), filters, methods) and attribute or item lookup checks the deadline, so nested
    loops stop within a range's worth of iterations; `*` and `**` are checked before they build a
    value (`'a' * 10**9` would allocate a gigabyte in one step); the output is counted as it streams.
    """

    intercepted_binops = frozenset(["*", "**"])

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(right) > 64:
            raise TemplateError("the template computes a huge power")
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
            size = len(left) * right
        elif operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
            size = len(right) * left
        else:
            size = 0
        if size > RENDER_CHARS:
            raise TemplateError(f"the template builds a value of {size:,} items")
        return super().call_binop(context, operator, left, right)

    def call(self, *args, **kwargs):
        _tick()
        return super().call(*args, **kwargs)

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)


def _tick() -> None:
    deadline = getattr(_limits, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateError(f"rendering took over {RENDER_SECONDS:g} s (a loop that does not end?)")


@lru_cache(maxsize=16)
def _compile(source: str):
    env = _Limited(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def render(template: str | None, messages: list[dict[str, str]], *, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True) -> str:
    _limits.deadline = time.monotonic() + RENDER_SECONDS
    try:
        out, size = [], 0
        for chunk in _compile(template or CHATML).generate(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
                eos_token=eos_token, tools=None, documents=None):
            size += len(chunk)
            if size > RENDER_CHARS:
                raise TemplateError(f"the rendered prompt passed {RENDER_CHARS:,} characters")
            _tick()
            out.append(chunk)
        return "".join(out)
    except (TemplateError, SecurityError, RecursionError, MemoryError, OverflowError) as e:
        raise EdgeLLMError(f"the model's chat template failed: {e}") from None
    finally:
        _limits.deadline = None
