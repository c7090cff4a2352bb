"""The tools a request declares and its tool_choice, checked before anything reaches the model."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.runtime import grammar

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names (a dot too, as Ollama's)
MAX_TOOLS = 128


class ToolError(EdgeLLMError):
    """A tool definition or tool_choice that cannot be used; the message names where (a 400)."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema of the arguments object

    def as_template(self) -> dict[str, Any]:
        """OpenAI's shape, which chat templates (Qwen's, Llama's, Mistral's) iterate over."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class Choice:
    mode: str  # "none", "auto", "required" or "function"
    name: str | None = None  # the function, for "function"

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


def read_tools(raw: list[Any] | None, where: str = "tools") -> list[Tool]:
    """OpenAI's and Ollama's `tools` ([{"type": "function", "function": {...}}]) as Tools."""
    if not raw:
        return []
    if len(raw) > MAX_TOOLS:
        raise ToolError(f"{where}: at most {MAX_TOOLS} tools")
    tools: list[Tool] = []
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ToolError(f"{here}: a tool is an object")
        kind = item.get("type", "function")
        if kind != "function":
            raise ToolError(f"{here}.type: {kind!r}: only \"function\" tools are supported")
        fn = item.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{here}.function: an object with name, description and parameters")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{here}.function.name: {name!r}: 1 to 64 letters, digits, _ . or -")
        if any(t.name == name for t in tools):
            raise ToolError(f"{here}.function.name: {name!r} is declared twice")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise ToolError(f"{here}.function.description: a string")
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ToolError(f"{here}.function.parameters: a JSON schema object")
        try:
            json.dumps(parameters, allow_nan=False)
            grammar.check_schema(parameters)
        except grammar.SchemaError as e:
            raise ToolError(f"{here}.function.parameters: {e}") from None
        except (TypeError, ValueError, RecursionError) as e:
            raise ToolError(f"{here}.function.parameters: not JSON: {e}") from None
        tools.append(Tool(name, description, parameters))
    return tools


def read_choice(raw: Any, tools: list[Tool], where: str = "tool_choice") -> Choice:
    """OpenAI's tool_choice: "none", "auto", "required", or {"type": "function", "function": {"name": ...}}."""
    if raw is None:
        return Choice("auto" if tools else "none")
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise ToolError(f'{where}: {raw!r}: "none", "auto", "required" or a function')
        choice = Choice(raw)
    elif isinstance(raw, dict):
        fn = raw.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if raw.get("type", "function") != "function" or not isinstance(name, str):
            raise ToolError(f'{where}: {{"type": "function", "function": {{"name": ...}}}}')
        if not any(t.name == name for t in tools):
            raise ToolError(f"{where}.function.name: {name!r} is not among the tools")
        choice = Choice("function", name)
    else:
        raise ToolError(f"{where}: a string or an object")
    if choice.mode != "none" and not tools:
        raise ToolError(f"{where}: {choice.mode!r} needs tools")
    return choice
