"""How declared tools and an agent loop's messages reach a model's prompt.

A template that writes tools itself (Qwen2.5's `# Tools` section and `<tool_call>` blocks, Llama 3.1's,
Mistral's) gets them as `tools`, assistant messages with `tool_calls` (arguments as objects, which such
templates `tojson`), and `role: "tool"` messages. Any other template gets what llama.cpp's generic handler
gives it: a system section that lists the tools and asks for a bare JSON call, assistant calls written back
as that JSON, and tool results as user turns.
"""

from __future__ import annotations

import json
from typing import Any

GENERIC = (
    "You can call these tools (JSON schemas of their arguments):\n{tools}\n\n"
    "To call a tool, reply with only a JSON object and nothing else: "
    '{{"name": <the tool\'s name>, "arguments": <an object of its arguments>}}. '
    "When no tool is needed, reply in plain text."
)


def writes_tools(template: str | None) -> bool:
    """The template renders `tools` itself (it names the variable)."""
    return bool(template) and "tools" in template


def generic_section(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
    return GENERIC.format(tools=listed)


def call_text(call: dict[str, Any]) -> str:
    fn = call.get("function", call)
    return json.dumps({"name": fn.get("name"), "arguments": fn.get("arguments")}, ensure_ascii=False)


def prepare(template: str | None, messages: list[dict[str, Any]],
            tools: list[dict[str, Any]] | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) to render with `template`."""
    has_tool_turns = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if writes_tools(template) or (not tools and not has_tool_turns):
        return messages, tools or None
    out: list[dict[str, Any]] = []
    for m in messages:
        role, content = m.get("role"), m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_text(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool":
            name = m.get("name") or m.get("tool_name")
            label = f"The result of the tool {name}" if name else "The tool's result"
            out.append({"role": "user", "content": f"{label}:\n{content}"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        section = generic_section(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out, None
