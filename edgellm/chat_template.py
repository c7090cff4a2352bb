"""Render a model's chat template (from GGUF metadata) in jinja2's sandbox, the way transformers does."""

from __future__ import annotations

import functools
import itertools
import json
import re
import threading
import time
import traceback
from collections.abc import ItemsView, KeysView, ValuesView
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError, Undefined, nodes, pass_environment, pass_eval_context
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace, generate_lorem_ipsum
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

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
_BITS = 1 << 20  # the largest integer a template may compute, in bits (Python prints 4,300 digits at most)
_limits = threading.local()


class _Limited(ImmutableSandboxedEnvironment):
    """The sandbox, plus limits on time and size: a GGUF's template is untrusted code.

    Time: every call (range(), filters, methods), attribute or item lookup and every item of a for loop
    checks the deadline, so nested loops stop within a range's worth of iterations.

    Size: no value may pass RENDER_CHARS characters of text, and each is refused before it is built (one
    step builds gigabytes: `'a' * 10**9`, `'x'.center(10**10)`). `*`, `**`, `+` and `%` check their
    operands; every call, filter and global checks its arguments, and those that grow a value by an amount
    an argument sets (a width, a count, a fill, a separator per item, a format's field widths) estimate
    what they would build first; `~`, list, tuple and dict displays, what a macro, block or `{% set %}`
    block renders and each `{{ }}` are checked too. Text is counted as printed: `[s] * n` costs n pointers
    in memory but n copies of s once printed or compared, and `[a, a]` nested 40 deep is 2**40 copies.
    What grows a value by at most a small constant factor (`upper`, `escape`, `tojson`, `urlize`) is left
    to the checks on what it feeds next. The output is also counted as it streams.
    """

    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def call_binop(self, context, operator, left, right):
        _tick()
        if operator in ("*", "**") and isinstance(left, int) and isinstance(right, int):
            bits = left.bit_length() * abs(right) if operator == "**" else left.bit_length() + right.bit_length()
            if (operator == "**" and abs(right) > 64) or bits > _BITS:
                raise TemplateError(f"the template computes a huge {'power' if operator == '**' else 'number'}")
        elif operator == "*" and isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
            _refuse(_size(left) * right)
        elif operator == "*" and isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
            _refuse(_size(right) * left)
        elif operator == "+" and isinstance(left, (str, bytes, list, tuple)):
            _refuse(_size(left) + _size(right))
        elif operator == "%" and isinstance(left, (str, bytes)):
            _refuse(_formatted(left, right))
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # jinja's names: a call may pass `self` or `obj`
        _tick()
        if __obj is not _Loop:  # a for loop's items are checked as it takes them
            if isinstance(__obj, LoopContext) and args:  # `loop(children)` in a recursive loop
                args = (_Loop(args[0]), *args[1:])
            receiver, name = getattr(__obj, "__self__", None), getattr(__obj, "__name__", None)
            estimate = (_METHODS.get(name) if isinstance(receiver, (str, bytes)) else
                        _to_bytes if isinstance(receiver, int) and name == "to_bytes" else
                        _fromkeys if receiver is dict and name == "fromkeys" else None)
            if estimate in (_str_joined, _fromkeys) and args and not isinstance(args[0], (list, tuple, str)):
                args = (list(args[0]), *args[1:])  # a generator: what it yields is measured, then passed on
            _refuse_values(receiver if isinstance(receiver, (str, bytes)) else None, *args, *kwargs.values())
            if estimate is not None:
                _refuse(_estimate(estimate, receiver, *args, **kwargs))
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj, attribute):
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        """jinja's sandboxed `str.format` and `str.format_map`, with a formatter that counts what it builds."""
        if super().wrap_str_format(value) is None:
            return None
        text = value.__self__

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if value.__name__ == "format_map":
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            formatter = _EscapeFormatter(self, escape=text.escape) if isinstance(text, Markup) else _Formatter(self)
            return type(text)(formatter.vformat(text, args, kwargs))

        return functools.update_wrapper(wrapper, value)

    def _parse(self, source, name, filename):
        return _Checks().visit(super()._parse(source, name, filename)).set_environment(self)


def _tick() -> None:
    deadline = getattr(_limits, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise TemplateError(f"rendering took over {RENDER_SECONDS:g} s (a loop that does not end?)")


def _refuse(size: int, *, measured: bool = False, verb: str = "builds") -> None:
    """Refuse a value of `size` characters, before it is built (`measured`: a count `_size` stopped at)."""
    if size > RENDER_CHARS:
        amount = f"over {RENDER_CHARS:,}" if measured else f"{size:,}"
        raise TemplateError(f"the template {verb} a value of {amount} characters")


def _refuse_values(*values: Any) -> None:
    """A call's arguments, together: a call may build a value of them all (`namespace(a=x, b=x)`)."""
    total = 0
    for value in values:
        total += _size(value)
        _refuse(total, measured=True)


def _size(value: Any, indent: int = 0) -> int:
    """How many characters the text of `value` (str() of it, its JSON) comes to, about, counted only to just
    past RENDER_CHARS: a container counts an item as often as it holds it, as its text repeats it, and one
    held again is counted from memory, so that counting costs no more than the limit. `indent`: characters
    added per item and level of nesting (JSON's)."""
    if isinstance(value, (str, bytes)):  # most are
        return len(value)
    if value is None or isinstance(value, (int, float, Undefined)):
        return value.bit_length() * 3 // 10 + 1 if isinstance(value, int) else 4
    total, steps, stack, known, sizes = 0, 0, [(iter((value,)), None, 0)], {}, getattr(_limits, "sizes", None) or {}
    while stack:
        for item in stack[-1][0]:
            if total > RENDER_CHARS:
                return total
            steps += 1
            if not steps & 0xFFFF:
                _tick()
            depth = len(stack) - 1
            if depth:
                total += 2 + indent * depth  # a separator, quotes
            if isinstance(item, (str, bytes)):
                total += len(item)
                continue
            if item is None or isinstance(item, (int, float, Undefined)):
                total += item.bit_length() * 3 // 10 + 1 if isinstance(item, int) else 4
                continue
            key = id(item)
            if key in sizes and not indent:  # the caller's messages
                total += sizes[key][1]
                continue
            if (key, depth) in known:
                total += known[key, depth]
                continue
            if isinstance(item, dict):
                items = itertools.chain.from_iterable(item.items())
            elif isinstance(item, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
                items = item
            elif isinstance(item, Namespace) and all(frame[1] is not item for frame in stack):  # not in itself
                items = itertools.chain.from_iterable(object.__getattribute__(item, "_Namespace__attrs").items())
            else:
                total += 4
                continue
            stack.append((iter(items), item, total))
            total += 2  # brackets
            break
        else:
            _, item, start = stack.pop()
            known[id(item), len(stack) - 1] = total - start
    return total


def _remember_sizes(messages: Any, sizes: dict) -> None:
    """The size of each list, tuple and dict in the caller's messages, measured once per render (they stay as
    they are): a call that passes them, as `macro(messages)` in a loop over them, need not measure them again."""
    found, stack, seen = [], [messages], set()
    while stack:
        value = stack.pop()
        if isinstance(value, (list, tuple, dict)) and id(value) not in seen:
            seen.add(id(value))
            found.append(value)
            stack.extend(value.values() if isinstance(value, dict) else value)
    for value in reversed(found):  # what a value holds was found after it: measured before it
        sizes[id(value)] = (value, _size(value))


def _estimate(estimate, *args: Any, **kwargs: Any) -> int:
    try:
        return estimate(*args, **kwargs)
    except TypeError:  # not the arguments the call takes: the call itself will say what is wrong
        return 0


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 13 else 10**13


def _n(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _text_len(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else _size(value)


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines splits at


def _formatted(text: str | bytes, args: Any) -> int:
    """`text % args`, about: the text, the arguments and each conversion's width and precision (`%*d`
    takes its width from the arguments)."""
    text = text.decode("latin-1") if isinstance(text, bytes) else text
    if not isinstance(text, str):
        return 0
    values, size, i = (args if isinstance(args, tuple) else (args,)), len(text) + _size(args), 0
    for conversion in _PERCENT.finditer(text):
        for number in conversion.group(1, 2):
            if number == "*":
                size += abs(_n(values[i])) if i < len(values) else 0
                i += 1
            elif number:
                size += _number(number)
        i += conversion.group(3) != "%"
    return size


def _replaced(s: Any, old: Any, new: Any, count: Any = -1, /) -> int:
    s, old, new = (x if isinstance(x, (str, bytes)) else str(x) for x in (s, old, new))
    times = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    return len(s) + times * max(len(new) - len(old), 0)


def _str_joined(separator: Any, items: list | tuple | str, /) -> int:
    try:
        parts = sum(map(len, items))
    except TypeError:  # an item that is not text: join says so
        return 0
    return parts + len(separator) * max(len(items) - 1, 0)


def _translated(s: Any, table: Any, /) -> int:
    if not isinstance(s, str):  # bytes.translate maps a byte to a byte
        return len(s)
    values = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
    return len(s) * max((len(v) for v in values if isinstance(v, str)), default=1)


def _to_bytes(_: int, length: Any = 1, *args: Any, **kwargs: Any) -> int:
    return _n(length)


def _fromkeys(_: type, keys: Any, value: Any = None, /) -> int:
    return len(keys) * (_size(value) + 4)


# str and bytes methods whose result can outgrow the string and its arguments by an amount they set
_METHODS = {
    "center": lambda s, width, fill=" ", /: max(len(s), _n(width)),
    "ljust": lambda s, width, fill=" ", /: max(len(s), _n(width)),
    "rjust": lambda s, width, fill=" ", /: max(len(s), _n(width)),
    "zfill": lambda s, width, /: max(len(s), _n(width)),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(_n(tabsize), 0),
    "replace": _replaced,
    "join": _str_joined,
    "translate": _translated,
    "encode": lambda s, encoding="utf-8", errors="strict": len(s) * (100 if errors == "namereplace" else 10),
}


def _indented(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> int:
    s = s if isinstance(s, str) else str(s)
    lines = 1 + sum(map(s.count, _LINE_BREAKS))
    return len(s) + (lines + 1) * (len(width) if isinstance(width, str) else max(_n(width), 0))


def _wrapped(s: Any, width: Any = 79, break_long_words: bool = True, wrapstring: Any = None, *_: Any) -> int:
    n = _text_len(s)  # at worst a line per character
    return n + (n + 1) * len(wrapstring if isinstance(wrapstring, str) else "\n")


def _filter_joined(value: Any, d: Any = "", attribute: Any = None) -> int:
    return _size(value) + len(str(d)) * max(len(value) - 1, 0)


def _urlized(value: Any, trim_url_limit: Any = None, nofollow: bool = False, target: Any = None, rel: Any = None,
             extra_schemes: Any = None) -> int:
    n = _text_len(value)  # an <a> with the target and rel per word at worst
    return n + (n // 2 + 1) * (len(str(target or "")) + len(str(rel or "")))


# filters and globals that can outgrow their arguments by an amount an argument sets
_FILTERS = {
    "center": lambda value, width=80: max(_text_len(value), _n(width)),
    "indent": _indented,
    "wordwrap": _wrapped,
    "replace": _replaced,
    "format": lambda value, *args, **kwargs: _formatted(value, kwargs or args),
    "join": _filter_joined,
    "batch": lambda value, linecount, fill_with=None: 0 if fill_with is None else _n(linecount) * (_size(fill_with) + 2),
    "slice": lambda value, slices, fill_with=None: _size(value) + _n(slices) * (_size(fill_with) + 4),
    "tojson": lambda value, indent=None, **_: _size(value, len(indent) if isinstance(indent, str) else _n(indent)),
    "pprint": lambda value: 4 * _size(value, 1),  # repr escapes a character in up to 4; pformat is slow: keep it small
    "urlize": _urlized,
    "urlencode": lambda value: 12 * _size(value),  # a character percent-encoded in up to 12
}
_GLOBALS = {
    "lipsum": (generate_lorem_ipsum, lambda n=5, html=True, min=20, max=100: _n(n) * (_n(max) * 15 + 10)),
    # CPython's strftime allocates up to 256 characters per character of the format
    "strftime_now": (lambda fmt: datetime.now().strftime(fmt), lambda fmt: 256 * _text_len(fmt)),
}


# filters that pick, count, order or regroup their value's items: they build no text, and what they return is
# no bigger than what they were given (checked when it was built), so they skip measuring it: `messages|length`
# in a loop over the messages would measure them all at each turn
_PASSIVE = frozenset(["abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int",
                      "items", "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr",
                      "reverse", "round", "select", "selectattr", "slice", "sort", "sum", "unique"])


def _guarded(function, estimate=None, passive=False):
    """`function` (a filter or a global) checking its arguments (unless `passive`), and what `estimate` says
    it would build."""
    passes = getattr(function, "jinja_pass_arg", None) is not None  # its first argument is jinja's own

    @functools.wraps(function)  # keeps jinja_pass_arg
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        head, args = args[:passes], args[passes:]
        if estimate is _filter_joined and args and not isinstance(args[0], (list, tuple, str)):
            args = (list(args[0]), *args[1:])  # a generator: what it yields is measured, then passed on
        if not passive:
            _refuse_values(*args, *kwargs.values())
        if estimate is not None:
            _refuse(_estimate(estimate, *args, **kwargs))
        return function(*head, *args, **kwargs)

    return guarded


def _summing(do_sum):
    """jinja's sum, on a copy of a list it starts from: it adds to its start in place, and a template's lists
    are immutable (`[l]|sum(start=l)` in a loop would double l at each turn, past any check)."""
    @pass_environment
    def summed(environment, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
        return do_sum(environment, iterable, attribute, list(start) if isinstance(start, list) else start)
    return summed


class _Formatter(SandboxedFormatter):
    """`str.format` in the sandbox, refusing a field (`{:>1000000000}`, `{:.100000000f}`) that would take
    the text past the size limit before formatting it."""

    built = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        _refuse(self.built + _size(value) + sum(map(_number, re.findall(r"\d+", format_spec))))
        text = super().format_field(value, format_spec)
        self.built += len(text)
        return text


class _EscapeFormatter(_Formatter, SandboxedEscapeFormatter):
    pass


class _Loop:
    """A for loop's items, checking the deadline at each: `{% for a in r %}{% for b in r %}{% endfor %}
    {% endfor %}` calls nothing else."""

    __slots__ = ("items",)

    def __init__(self, items: Any) -> None:
        self.items = items

    def __iter__(self):
        for item in self.items:
            _tick()
            yield item

    def __len__(self) -> int:  # loop.length, loop.last
        return len(self.items)


@pass_eval_context
def _joined(eval_ctx, values: list) -> str:
    """`a ~ b`, as jinja joins it (its arguments' size was checked as any call's)."""
    return (markup_join if eval_ctx.autoescape else str_join)(values)


def _concat(parts) -> str:
    """What a macro, call block, filter block or `{% set %}` block renders, joined once its size is known."""
    parts = list(parts)
    _refuse(sum(map(len, parts)))
    return "".join(parts)


def _printed(value: Any) -> Any:
    """Each `{{ }}`'s value, before jinja turns it into text."""
    _refuse(_size(value), measured=True, verb="prints")
    return value


class _Checks(NodeTransformer):
    """Rewrites a parsed template so that what jinja does without a call is a call the sandbox checks: a for
    loop takes its items through _Loop, `~` is _joined, and a list, tuple or dict display that is not
    constant passes through `checked_value` (which returns it: checking a call's arguments is the point)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = _call("checked_loop", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        try:
            node.as_const()  # jinja folds it as it compiles (as str, even in autoescape: keep that)
        except Exception:  # not constant: checked as it runs
            return _call("checked_join", nodes.List(node.nodes, lineno=node.lineno))
        return node

    def visit_List(self, node: nodes.Expr) -> nodes.Node:
        node = self.generic_visit(node)
        values = [value for item in node.iter_child_nodes()
                  for value in ((item.key, item.value) if isinstance(item, nodes.Pair) else (item,))]
        if getattr(node, "ctx", "load") != "load" or all(isinstance(value, nodes.Const) for value in values):
            return node  # an assignment's target, or a constant
        return _call("checked_value", node)

    visit_Tuple = visit_Dict = visit_List


def _call(name: str, argument: nodes.Expr) -> nodes.Call:
    """`environment.<name>(argument)`, called the sandbox's way."""
    line = argument.lineno
    return nodes.Call(nodes.EnvironmentAttribute(name, lineno=line), [argument], [], None, None, lineno=line)


def _counted(render):
    """A `{% block %}`'s render function, stopped once its output passes the size limit: `self.name()` and
    `super()` join it whole."""
    def counted(context):
        size = 0
        for chunk in render(context):
            size += len(chunk)
            _refuse(size)
            yield chunk
    return counted


def _environment() -> _Limited:
    env = _Limited(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"], finalize=_printed)
    env.concat = _concat
    env.checked_loop, env.checked_join, env.checked_value = _Loop, _joined, lambda value: value
    env.filters["tojson"] = _tojson
    env.filters["sum"] = _summing(env.filters["sum"])
    env.filters = {name: _guarded(f, _FILTERS.get(name), name in _PASSIVE) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise
    env.globals.update({name: _guarded(f, estimate) for name, (f, estimate) in _GLOBALS.items()})
    return env


@lru_cache(maxsize=16)
def _compile(source: str):
    template = _environment().from_string(source)
    template.blocks = {name: _counted(render) for name, render in template.blocks.items()}
    return template


def render(template: str | None, messages: list[dict[str, Any]], *, bos_token: str = "",
           eos_token: str = "", add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
    """The prompt text; any failure of the template (syntax, a limit, any exception its code raises)
    is an EdgeLLMError of one line that names the template's line. `tools`: OpenAI-shaped function
    definitions, for a template that writes them itself (edgellm/tools/prompt.py decides)."""
    _limits.deadline = time.monotonic() + RENDER_SECONDS
    try:
        _limits.sizes = {}
        _remember_sizes([messages, tools], _limits.sizes)
        out, size = [], 0
        chunks = _compile(template or CHATML).generate(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, tools=tools or None, documents=None)
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
        _limits.deadline = _limits.sizes = None


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
            line = (getattr(token, "lineno", None) or getattr(this, "lineno", None)
                    or getattr(frame.f_locals.get("node"), "lineno", None))  # a node transformer's
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
