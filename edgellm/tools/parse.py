"""A model's reply read back into tool calls.

Each template family writes calls its own way: Hermes/Qwen `<tool_call>{...}</tool_call>` blocks, Llama 3.x
`<|python_tag|>{...}` (or a bare `{"name": ..., "parameters": ...}`), Mistral `[TOOL_CALLS][{...}]`. Small
models often write a bare JSON object instead, or one inside a ```json fence, whatever their template says
(Qwen2.5-Coder-0.5B does). All these are read, whatever the family; a call counts only when it names a
declared tool and its arguments validate against that tool's parameters. A reply with anything else that
looks like a call is returned as text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgellm.tools.declare import Tool

TAGGED = [
    re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S),  # Hermes, Qwen2.5
    re.compile(r"\[TOOL_CALLS\](.*)$", re.S),  # Mistral
    re.compile(r"<\|python_tag\|>(.*?)(?:<\|eom_id\|>|<\|eot_id\|>|$)", re.S),  # Llama 3.x
    re.compile(r"<function=([A-Za-z0-9_.-]+)>(.*?)</function>", re.S),  # Llama 3.1's custom format
]
FENCE = re.compile(r"```(?:json|JSON|tool_call|tool_code)?[ \t]*\n?(.*?)```", re.S)
OPENERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<function=", "```")  # where a call may start


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}

    def ollama(self) -> dict[str, Any]:
        return {"function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class Parsed:
    content: str  # the text outside the calls
    calls: list[Call]


def parse(text: str, tools: list[Tool]) -> Parsed:
    """The calls in `text`, or none (and all of `text` as content) when any would-be call is not valid."""
    if not tools:
        return Parsed(text, [])
    for pattern in TAGGED:
        spans = list(pattern.finditer(text))
        if spans:
            calls = []
            for m in spans:
                found = _calls(_loads(m.group(2)), tools, name=m.group(1)) if pattern.groups == 2 \
                    else _calls(_loads(m.group(1)), tools)
                if found is None:
                    return Parsed(text, [])
                calls += found
            return Parsed(_outside(text, spans), calls)
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        found = _calls(_loads(stripped), tools)
        return Parsed("", found) if found else Parsed(text, [])
    fences = list(FENCE.finditer(text))
    if fences:
        calls = []
        for m in fences:
            found = _calls(_loads(m.group(1)), tools)
            if not found:
                return Parsed(text, [])
            calls += found
        return Parsed(_outside(text, fences), calls)
    return Parsed(text, [])


def _outside(text: str, spans: list[re.Match]) -> str:
    parts, at = [], 0
    for m in spans:
        parts.append(text[at:m.start()])
        at = m.end()
    parts.append(text[at:])
    return "".join(parts).rstrip()


def _loads(body: str) -> Any:
    body = body.strip()
    fenced = FENCE.fullmatch(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _calls(value: Any, tools: list[Tool], name: str | None = None) -> list[Call] | None:
    """The valid calls `value` holds (an object, or a list of them); None when it holds anything else."""
    items = value if isinstance(value, list) else [value]
    if not items:
        return None
    calls = []
    for item in items:
        call = _call(item, tools, name)
        if call is None:
            return None
        calls.append(call)
    return calls


def _call(item: Any, tools: list[Tool], name: str | None) -> Call | None:
    if not isinstance(item, dict):
        return None
    if name is not None:  # <function=NAME>{arguments}</function>
        item = {"name": name, "arguments": item}
    for wrapper in ("tool_call", "function_call"):  # llama.cpp's generic format, OpenAI's old one
        if isinstance(item.get(wrapper), dict) and len(item) == 1:
            item = item[wrapper]
    if isinstance(item.get("function"), dict):  # OpenAI's own shape
        item = item["function"]
    fn = item.get("name", item.get("function"))
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    tool = next((t for t in tools if t.name == fn), None)
    if tool is None or not isinstance(args, dict) or not valid(args, tool.parameters):
        return None
    return Call(tool.name, args)


def valid(args: dict[str, Any], schema: dict[str, Any]) -> bool:
    from jsonschema import validators

    try:
        return validators.validator_for(schema)(schema).is_valid(args)
    except Exception:  # a schema jsonschema cannot follow (a remote $ref): such arguments are not accepted
        return False
