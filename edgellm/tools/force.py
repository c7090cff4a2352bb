"""The grammars of tool_choice: one that forces a call ("required" or a named function), one that rules
calls out ("none").

The call is the bare JSON object `{"name": ..., "arguments": {...}}` whose arguments follow the function's
parameters schema: every template family's parser accepts it (parse.py), and the grammar does not depend on
how a tokenizer splits a family's tags (`<tool_call>` is one token in Qwen's vocabulary).
"""

from __future__ import annotations

from typing import Any

from edgellm.runtime import grammar
from edgellm.tools.declare import Choice, Tool, ToolError

# tool_choice "none": the reply cannot open as a call would (JSON, a tag, a fence). A small model that has seen
# calls in the conversation otherwise writes the call again as text instead of answering from its result.
TEXT_GBNF = r"root ::= [^{\[<`\x00-\x20] [^\x00]*"


def call_schema(tool: Tool) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_gbnf(tools: list[Tool], choice: Choice) -> str | None:
    """The GBNF a reply under `choice` follows; None for "auto"."""
    if choice.mode == "none":
        return TEXT_GBNF if tools else None
    if not choice.forced:
        return None
    chosen = [t for t in tools if choice.mode == "required" or t.name == choice.name]
    for tool in chosen:  # each alone first, so that an error's pointer is the parameters' own
        try:
            grammar.schema_to_gbnf(tool.parameters)
        except grammar.SchemaError as e:
            raise ToolError(f"tools[{tools.index(tool)}].function.parameters: {e}") from None
    schema = call_schema(chosen[0]) if len(chosen) == 1 else {"anyOf": [call_schema(t) for t in chosen]}
    try:
        return grammar.schema_to_gbnf(schema)
    except grammar.SchemaError as e:
        raise ToolError(f"tools: the call cannot be forced by a grammar: {e}") from None
