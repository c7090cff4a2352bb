"""Render a model's chat template (from GGUF metadata) in jinja2's sandbox, the way transformers does."""

from __future__ import annotations

import json
import re
import threading
import time
import traceback
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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


def _environment() -> _Limited:
    env = _Limited(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@lru_cache(maxsize=16)
def _compile(source: str):
    return _environment().from_string(source)


def render(template: str | None, messages: list[dict[str, str]], *, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """The prompt text; any failure of the template (syntax, a limit, any exception its code raises)
    is an EdgeLLMError of one line that names the template's line."""
    _limits.deadline = time.monotonic() + RENDER_SECONDS
    try:
        out, size = [], 0
        chunks = _compile(template or CHATML).generate(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, tools=None, documents=None)
        for chunk in chunks:
            size += len(chunk)
            try:
                if size > RENDER_CHARS:
                    raise TemplateError(f"the rendered prompt passed {RENDER_CHARS:,} characters")
                _tick()
            except TemplateError as e:
                chunks.throw(e)  # raised at the template's yield, so the traceback carries its line
            out.append(chunk)
        return "".join(out)
    except Exception as e:  # a GGUF's template is untrusted: whatever it raises is the file's fault
        raise EdgeLLMError(_describe(e, template or CHATML)) from None
    finally:
        _limits.deadline = None


def _line(e: BaseException, source: str) -> int | None:
    """The template line where `e` happened."""
    if isinstance(e, TemplateSyntaxError):
        return e.lineno
    frames = list(traceback.walk_tb(e.__traceback__))
    # rendering: jinja rewrites the traceback so template code runs in frames named <template>
    lines = [n for frame, n in frames if frame.f_code.co_filename == "<template>"]
    if lines:
        return lines[-1]  # the innermost: a macro's line, not its caller's
    for frame, _ in reversed(frames):  # compiling (a RecursionError): the parser's token or the node being walked
        if frame.f_globals.get("__name__", "").startswith("jinja2."):
            this = frame.f_locals.get("self")
            token = getattr(getattr(this, "stream", None), "current", None)
            line = getattr(token, "lineno", None) or getattr(this, "lineno", None)
            if isinstance(line, int):
                return line
    if isinstance(e, SyntaxError) and e.filename == "<template>" and e.lineno:  # Python refused jinja's code
        code = _environment().compile(source, raw=True)
        mapping = re.search(r"^debug_info = '([\d=&]*)'$", code, re.M)
        pairs = [tuple(map(int, kv.split("="))) for kv in mapping.group(1).split("&") if kv] if mapping else []
        return next((t for t, c in reversed(pairs) if c <= e.lineno), 1)  # as Template.get_corresponding_lineno
    return None


def _describe(e: BaseException, source: str) -> str:
    """`the model's chat template failed at line N: why`, on one line."""
    try:
        line = _line(e, source)
    except Exception:  # finding the line must not hide the error
        line = None
    why = e.message if isinstance(e, TemplateSyntaxError) else e.msg if isinstance(e, SyntaxError) else str(e)
    why = " ".join((why or "").split())
    if len(why) > 200:
        why = why[:200] + "…"
    if not why:
        why = type(e).__name__
    elif not isinstance(e, TemplateError):  # jinja's and our own messages say what; a Python error needs its name
        why = f"{type(e).__name__}: {why}"
    where = f" at line {line}" if line is not None else ""
    return f"the model's chat template failed{where}: {why}"
