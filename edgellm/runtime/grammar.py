"""Structured output: a JSON schema -> a GBNF grammar for llama.cpp's grammar sampler (Sampler puts it first).

The grammar is written by llama-cpp-python's converter (`llama_cpp.llama_grammar.SchemaConverter`, its copy
of llama.cpp's json_schema_to_grammar.py). That copy silently drops what it cannot express (numeric bounds,
`not`, `oneOf`'s "exactly one", ...), so a schema is first checked against its metaschema (jsonschema), then
rewritten into the subset the converter renders exactly; anything else is refused with the keyword and the
JSON pointer of the problem. A few of the copy's gaps are fixed in a subclass: string characters exclude
raw control characters (JSON forbids them), literals escape backslashes, `$ref` rules get unique names, and
length and item bounds use GBNF's own `{m,n}` (the copy nests one group per item: a parse recursion as deep
as maxLength). Every reply the grammar allows parses and validates against the schema; with whitespace
limited to one space (the converter's rule) a small model cannot run away into blank lines.

Compilation is cached per schema (its compact JSON text, key order kept: properties come out in order).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import llama_cpp as C
from llama_cpp.llama_grammar import INVALID_RULE_CHARS_RE, PRIMITIVE_RULES, RESERVED_NAMES, BuiltinRule, SchemaConverter

from edgellm.errors import EdgeLLMError

MAX_REPEAT = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD: above it, `{m,n}` silently loses its maximum
MAX_GRAMMAR_CHARS = 256 << 10
MAX_NODES = 20_000  # subschemas once anyOf and type lists are expanded (siblings copied into each alternative)
CACHED_SCHEMA_CHARS = 64 << 10  # larger schemas are compiled each time rather than held in the cache
FORMATS = ("date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5")  # the converter's

# JSON forbids raw control characters in strings (the copy's `[^"\\]` lets a newline through); no \u escape of a
# surrogate either: a pair would be one character to a validator and two to the grammar's maxLength
CHAR = BuiltinRule(r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | '
                   r'[dD] [0-7] [0-9a-fA-F]{2}))', [])

OBJECT_KEYWORDS = ("properties", "required", "additionalProperties", "patternProperties", "propertyNames",
                   "minProperties", "maxProperties", "dependentRequired", "dependentSchemas", "dependencies",
                   "unevaluatedProperties")
ARRAY_KEYWORDS = ("items", "prefixItems", "additionalItems", "minItems", "maxItems", "contains", "minContains",
                  "maxContains", "uniqueItems", "unevaluatedItems")
STRING_KEYWORDS = ("minLength", "maxLength", "pattern", "format")
NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# keywords that constrain a value whatever its type
GENERAL_KEYWORDS = ("type", "enum", "const", "anyOf", "oneOf", "allOf", "not", "if", "then", "else", "$ref",
                    "$dynamicRef", "$recursiveRef")
CONSTRAINTS = frozenset(OBJECT_KEYWORDS + ARRAY_KEYWORDS + STRING_KEYWORDS + NUMBER_KEYWORDS + GENERAL_KEYWORDS)

# what cannot be expressed, and why (the message names the keyword)
UNSUPPORTED = {
    "not": "a grammar cannot exclude a schema",
    "if": "conditional schemas", "then": "conditional schemas", "else": "conditional schemas",
    "oneOf": "a grammar cannot enforce exactly one match; use anyOf",
    "allOf": "only a single-schema allOf is supported",
    "$dynamicRef": "dynamic references", "$recursiveRef": "recursive references",
    "patternProperties": "property names by pattern", "propertyNames": "property names by schema",
    "minProperties": "property counts", "maxProperties": "property counts",
    "dependentRequired": "dependent properties", "dependentSchemas": "dependent properties",
    "dependencies": "dependent properties", "unevaluatedProperties": "only false is supported",
    "contains": "array contents by schema", "minContains": "array contents by schema",
    "maxContains": "array contents by schema", "uniqueItems": "unique items",
    "unevaluatedItems": "only false is supported",
    "minimum": "numeric bounds", "maximum": "numeric bounds", "exclusiveMinimum": "numeric bounds",
    "exclusiveMaximum": "numeric bounds", "multipleOf": "numeric multiples",
}


class SchemaError(EdgeLLMError):
    """A schema that is malformed or that a grammar cannot express: one line naming where."""


class InvalidSchema(SchemaError):
    def __init__(self, pointer: str, message: str) -> None:
        message = " ".join(message.split())
        super().__init__(f"invalid schema at {pointer}: {message[:200]}")
        self.pointer = pointer


class UnsupportedSchema(SchemaError):
    def __init__(self, keyword: str, pointer: str, why: str) -> None:
        super().__init__(f"unsupported keyword {keyword!r} at {pointer} ({why})")
        self.keyword, self.pointer = keyword, pointer


class GrammarError(EdgeLLMError):
    """llama.cpp did not accept a grammar (a converter bug: the schema itself was accepted)."""


def pointer(parts: Any) -> str:
    """A JSON pointer ('#/properties/a') for a path of keys and indexes."""
    return "#" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


# -- the public entry points ------------------------------------------------------------------------------

def schema_to_gbnf(schema: Any) -> str:
    """GBNF text whose every string parses as JSON and validates against `schema` (a dict or a bool)."""
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidSchema("#", f"not JSON: {e}") from e
    except RecursionError as e:
        raise InvalidSchema("#", "nested too deeply") from e
    return _compile(text) if len(text) <= CACHED_SCHEMA_CHARS else _compile.__wrapped__(text)


@lru_cache(maxsize=1)
def json_object_gbnf() -> str:
    """Any JSON object (OpenAI's json_object, Ollama's "json")."""
    return schema_to_gbnf({"type": "object"})


@lru_cache(maxsize=128)
def _compile(text: str) -> str:
    schema = json.loads(text)
    try:
        check_schema(schema)
        normalizer = Normalizer(schema)
        root = normalizer.node(schema, ())
        converter = Converter(normalizer.refs)
        converter.visit(root, "")
        grammar = converter.format_grammar()
    except RecursionError as e:
        raise InvalidSchema("#", "nested too deeply") from e
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:  # the converter's own refusals
        raise SchemaError(f"the schema could not be turned into a grammar: {e}") from e
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise SchemaError(f"the schema makes a grammar of {len(grammar) >> 10} KiB (at most "
                          f"{MAX_GRAMMAR_CHARS >> 10}): simplify it")
    return grammar


def check_schema(schema: Any) -> None:
    """Against its metaschema ($schema, else Draft 2020-12): InvalidSchema naming the pointer of the problem."""
    from jsonschema import Draft202012Validator, validators
    from jsonschema.exceptions import best_match

    if not isinstance(schema, dict | bool):
        raise InvalidSchema("#", f"a schema is a JSON object or a boolean, not {type(schema).__name__}")
    cls = validators.validator_for(schema, default=Draft202012Validator)
    meta = cls(cls.META_SCHEMA, format_checker=cls.FORMAT_CHECKER)
    error = best_match(meta.iter_errors(schema))
    if error is not None:
        raise InvalidSchema(pointer(error.absolute_path), error.message)


def check_grammar(gbnf: str) -> None:
    """llama.cpp parses the grammar (llama_sampler_init_grammar returns NULL otherwise): GrammarError if not.

    Cached per grammar. Call it where llama.cpp is called (the llama thread of a server)."""
    _accepted(gbnf)


@lru_cache(maxsize=64)
def _accepted(gbnf: str) -> bool:
    from edgellm.runtime import backend

    backend.init()
    with _stderr_captured() as captured:  # its parser prints the error and the whole grammar with fprintf
        sampler = C.llama_sampler_init_grammar(None, gbnf.encode(), b"root")  # parsing needs no vocabulary
    if not sampler:
        why = next((line.split("error parsing grammar: ", 1)[1] for line in captured
                    if "error parsing grammar: " in line), backend.last_error or "parse error")
        raise GrammarError(f"llama.cpp refused the grammar made from the schema: {why.strip()[:200]}")
    C.llama_sampler_free(sampler)
    for line in captured:
        sys.stderr.write(line)
    return True


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines.extend(f.read().decode("utf-8", errors="replace").splitlines(keepends=True))


# -- a schema -> the subset the converter renders exactly ---------------------------------------------------

def _bool_schema(s: Any, where: tuple) -> dict:
    if s is True:
        return {}
    if s is False:
        raise UnsupportedSchema("false", pointer(where), "no value satisfies it")
    return s


class Normalizer:
    """Rewrites a schema into what the converter renders without loss, or refuses it.

    Each node comes out as one of: {} (any value), a $ref, an anyOf, a const, an enum, or a single type with
    only the keywords the converter honours for it. Keywords that do not apply to the node's type are dropped
    (a validator ignores them too); annotations and unknown keywords are dropped."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.refs: dict[str, dict | None] = {}  # $ref text -> its normalized target
        self.nodes = 0

    def node(self, s: Any, where: tuple) -> dict:
        s = _bool_schema(s, where)
        here = pointer(where)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise SchemaError(f"the schema is too large for a grammar: over {MAX_NODES} subschemas once anyOf "
                              f"and type lists are expanded (at {here})")
        for kw in ("$dynamicRef", "$recursiveRef", "not", "if", "then", "else", "oneOf"):
            if kw in s:
                raise UnsupportedSchema(kw, here, UNSUPPORTED[kw])
        rest = {k: v for k, v in s.items() if k in CONSTRAINTS}
        if "allOf" in rest:
            parts = rest.pop("allOf")
            if len(parts) != 1 or rest:
                raise UnsupportedSchema("allOf", here, UNSUPPORTED["allOf"])
            return self.node(parts[0], (*where, "allOf", 0))
        if "$ref" in rest:
            ref = rest.pop("$ref")
            if rest:
                raise UnsupportedSchema(next(iter(rest)), here, "only annotations may stand beside $ref")
            self.ref(ref, where)
            return {"$ref": ref}
        if isinstance(rest.get("type"), list):
            types = rest.pop("type")
            return self.union([{"type": t} for t in dict.fromkeys(types)], rest, where, None)
        if "anyOf" in rest:
            alternatives = rest.pop("anyOf")
            return self.union(alternatives, rest, where, "anyOf")
        if "const" in rest:
            return {"const": _consistent("const", [rest["const"]], rest, here)[0]}
        if "enum" in rest:
            return {"enum": _consistent("enum", rest["enum"], rest, here)}
        kind = rest.get("type") or self.infer(rest)
        if kind == "object":
            return self.object(rest, where)
        if kind == "array":
            return self.array(rest, where)
        if kind == "string":
            return self.string(rest, where)
        if kind in ("number", "integer"):
            bad = next((k for k in NUMBER_KEYWORDS if k in rest), None)
            if bad:
                raise UnsupportedSchema(bad, here, UNSUPPORTED[bad])
            return {"type": kind}
        if kind in ("boolean", "null"):
            return {"type": kind}
        return {}  # any value

    @staticmethod
    def infer(s: dict) -> str | None:
        """The type a node without one gets: the one its keywords are about (others do not constrain it)."""
        for kind, keywords in (("object", OBJECT_KEYWORDS), ("array", ARRAY_KEYWORDS), ("string", STRING_KEYWORDS),
                               ("number", NUMBER_KEYWORDS)):
            if any(k in s for k in keywords):
                return kind
        return None

    def union(self, alternatives: list, rest: dict, where: tuple, keyword: str | None) -> dict:
        """anyOf (or a list of types) with sibling keywords: the siblings go into each alternative
        (allOf(A, anyOf(B, C)) = anyOf(A+B, A+C) when A and B share no keyword)."""
        out = []
        for i, alt in enumerate(alternatives):
            at = (*where, keyword, i) if keyword else where
            if alt is False:
                continue
            alt = _bool_schema(alt, at)
            both = next((k for k in alt if k in rest and k in CONSTRAINTS), None)
            if both is not None:
                raise UnsupportedSchema(both, pointer(at), f"{both!r} both beside anyOf and inside it")
            out.append(self.node({**rest, **alt}, at))
        if not out:
            raise UnsupportedSchema(keyword or "type", pointer(where), "no alternative can be satisfied")
        return out[0] if len(out) == 1 else {"anyOf": out}

    def ref(self, ref: Any, where: tuple) -> None:
        here = pointer(where)
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise UnsupportedSchema("$ref", here, f"only references inside the schema (#/...) are supported, not {ref!r}")
        if ref in self.refs:
            return  # done, or in progress (a recursive schema)
        target: Any = self.root
        path: list[str | int] = []
        for raw in ref[2:].split("/") if ref != "#" else []:
            key = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and key.isdigit() and int(key) < len(target):
                target, key = target[int(key)], int(key)
            elif isinstance(target, dict) and key in target:
                target = target[key]
            else:
                raise UnsupportedSchema("$ref", here, f"{ref!r} points at nothing")
            path.append(key)
        self.refs[ref] = None
        self.refs[ref] = self.node(target, tuple(path))

    def object(self, s: dict, where: tuple) -> dict:
        here = pointer(where)
        for kw in OBJECT_KEYWORDS:
            if kw in UNSUPPORTED and kw in s and not (kw == "unevaluatedProperties" and s[kw] is False):
                raise UnsupportedSchema(kw, here, UNSUPPORTED[kw])
        props = s.get("properties", {})
        required = s.get("required", [])
        missing = [name for name in required if name not in props]
        if missing:
            raise UnsupportedSchema("required", here, f"{', '.join(map(repr, missing))} not under properties")
        extra = s.get("additionalProperties", True)
        if props:  # declared properties only: an extra key could repeat one of them with another value
            kept = {k: v for k, v in props.items() if v is not False or k in required}  # false: never present
            return {"type": "object", "required": required, "additionalProperties": False,
                    "properties": {k: self.node(v, (*where, "properties", k)) for k, v in kept.items()}}
        if extra is True or extra == {}:
            return {"type": "object"}  # any object
        if extra is False:
            return {"type": "object", "properties": {}, "additionalProperties": False}
        return {"type": "object", "additionalProperties": self.node(extra, (*where, "additionalProperties"))}

    def array(self, s: dict, where: tuple) -> dict:
        here = pointer(where)
        for kw in ARRAY_KEYWORDS:
            if kw in UNSUPPORTED and kw in s and not (kw in ("uniqueItems", "unevaluatedItems") and s[kw] is False):
                raise UnsupportedSchema(kw, here, UNSUPPORTED[kw])
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        items, prefix = s.get("items"), s.get("prefixItems")
        if isinstance(items, list):  # drafts before 2020-12: a tuple
            prefix, items = items, None
        if prefix is not None:
            if items not in (None, False):
                raise UnsupportedSchema("items", here, "items beside prefixItems (extra tuple items)")
            if not lo <= len(prefix) <= (hi if hi is not None else len(prefix)):
                raise UnsupportedSchema("minItems" if lo > len(prefix) else "maxItems", here,
                                        f"the tuple has {len(prefix)} items")
            return {"type": "array", "prefixItems": [self.node(p, (*where, "prefixItems", i))
                                                     for i, p in enumerate(prefix)]}
        if items is False:  # no items at all
            items, hi = {}, 0
        for kw, n in (("minItems", lo), ("maxItems", hi)):
            if n is not None and n > MAX_REPEAT:
                raise UnsupportedSchema(kw, here, f"at most {MAX_REPEAT}")
        if hi is not None and lo > hi:
            raise UnsupportedSchema("minItems", here, "above maxItems: no array satisfies it")
        item = self.node(items if items is not None else {}, (*where, "items"))
        return {"type": "array", "items": item, "minItems": lo, "maxItems": hi}

    def string(self, s: dict, where: tuple) -> dict:
        here = pointer(where)
        lengths = [k for k in ("minLength", "maxLength") if k in s]
        fmt, pattern = s.get("format"), s.get("pattern")
        if fmt is not None:
            if fmt not in FORMATS:
                raise UnsupportedSchema("format", here, f"{fmt!r} (supported: {', '.join(FORMATS[:4])})")
            if pattern is not None or lengths:
                raise UnsupportedSchema("pattern" if pattern is not None else lengths[0], here, "beside format")
            return {"type": "string", "format": fmt}
        if pattern is not None:
            if lengths:
                raise UnsupportedSchema(lengths[0], here, "beside pattern")
            check_pattern(pattern, here)
            return {"type": "string", "pattern": pattern}
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        for kw, n in (("minLength", lo), ("maxLength", hi)):
            if n is not None and n > MAX_REPEAT:
                raise UnsupportedSchema(kw, here, f"at most {MAX_REPEAT}")
        if hi is not None and lo > hi:
            raise UnsupportedSchema("minLength", here, "above maxLength: no string satisfies it")
        if not lengths:
            return {"type": "string"}
        return {"type": "string", "minLength": lo, "maxLength": hi}


QUANTIFIER = re.compile(r"\{\d+(,\d*)?\}")


def _consistent(keyword: str, values: list, rest: dict, here: str) -> list:
    """The enum or const values that the node's other keywords allow (the converter writes the values alone)."""
    from jsonschema import Draft202012Validator

    others = {k: v for k, v in rest.items() if k not in ("enum", "const")}
    if not others:
        return values
    validator = Draft202012Validator(others)
    kept = []
    for value in values:
        try:
            ok = validator.is_valid(value)
        except Exception:  # a $ref below that needs the whole document: its own node checks it
            ok = True
        if ok:
            kept.append(value)
    if not kept:
        raise UnsupportedSchema(keyword, here, "no value satisfies the rest of the schema")
    return kept


def _plain_char(c: str) -> bool:
    """A character a pattern may name as it is: the converter copies it into the JSON text unescaped."""
    return c not in '"\\' and 0x20 <= ord(c) != 0x7F


def check_pattern(pattern: str, here: str) -> None:
    """The regular expressions the converter turns into a grammar exactly: anchored (^...$), with literal
    characters, positive classes ([a-z0-9_]), groups, alternation and quantifiers. Backslash escapes, `.`
    and negated classes would let a quote, a backslash or a control character into the JSON text."""
    def refuse(why: str) -> None:
        raise UnsupportedSchema("pattern", here, f"{why} (supported: ^...$ with literals, [a-z] classes, groups, "
                                                 "| and quantifiers)")

    if len(pattern) < 2 or not pattern.startswith("^") or not pattern.endswith("$"):
        refuse("it must be anchored with ^ and $")
    body = pattern[1:-1]
    if "(?" in body:
        refuse("(? groups")
    depth, i = 0, 0
    while i < len(body):
        c = body[i]
        if c == "{":
            m = QUANTIFIER.match(body, i)
            if m is None or i == 0 or body[i - 1] in "(|":
                refuse("a { that is no quantifier")
            bounds = [int(n) for n in m.group(0)[1:-1].split(",") if n]
            if max(bounds) > 256 or (len(bounds) == 2 and bounds[0] > bounds[1]):
                refuse(f"the quantifier {m.group(0)} (at most 256, min before max)")  # the converter nests one group each
            i = m.end()
        elif c in "()":
            depth += 1 if c == "(" else -1
            if depth < 0:
                refuse("unbalanced parentheses")
            i += 1
        elif c in "*+?" and (i == 0 or body[i - 1] in "(|"):
            refuse(f"{c!r} after nothing")
        elif c == "[":
            end = body.find("]", i + 1)
            if end < 0:
                refuse("an unclosed class")
            inner = body[i + 1:end]
            if inner.startswith("^") or "[" in inner or not inner:
                refuse("a negated or nested class")
            j = 0
            while j < len(inner):
                if j + 2 < len(inner) and inner[j + 1] == "-":
                    lo, hi = inner[j], inner[j + 2]
                    if not all(_plain_char(chr(o)) for o in range(ord(lo), ord(hi) + 1)):
                        refuse(f"the range {lo}-{hi} holds a quote, a backslash or a control character")
                    j += 3
                else:
                    if not _plain_char(inner[j]):
                        refuse(f"{inner[j]!r} in a class")
                    j += 1
            i = end + 1
        elif c in "^$.\\]}":
            refuse(f"{c!r} inside the pattern")
        elif not _plain_char(c):
            refuse(f"{c!r}")
        else:
            i += 1
    if depth:
        refuse("unbalanced parentheses")


# -- the converter, with its gaps filled --------------------------------------------------------------------

def _repeat(item: str, lo: int, hi: int | None, separator: str | None = None) -> str:
    """GBNF's own `{m,n}`: llama.cpp expands it into a flat chain of rules."""
    if separator is None:
        return f"{item}{{{lo},{'' if hi is None else hi}}}"
    if hi == 0:
        return ""
    more = "" if hi == 1 else f" ({separator} {item}){{{max(lo - 1, 0)},{'' if hi is None else hi - 1}}}"
    return f"{item}{more}" if lo > 0 else f"({item}{more})?"


class Converter(SchemaConverter):
    def __init__(self, refs: dict[str, dict | None]) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._refs = refs  # resolved by the Normalizer, targets normalized
        self._ref_names: dict[str, str] = {}

    def _format_literal(self, literal: str) -> str:
        escaped = literal.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r").replace("\n", "\\n")
        return f'"{escaped}"'

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return super()._add_primitive(name, CHAR if rule is PRIMITIVE_RULES["char"] else rule)

    def _resolve_ref(self, ref: str) -> str:
        # one rule per reference, named after its whole path (the copy names it after the last segment,
        # which a property of that name may already hold)
        name = self._ref_names.get(ref)
        if name is None:
            name = self._ref_names[ref] = "ref" + INVALID_RULE_CHARS_RE.sub("-", ref[1:]).rstrip("-")
            got = self.visit(self._refs[ref], name)  # a primitive comes back under its own name ("string")
            if got != name and self._add_rule(name, got) != name:
                raise UnsupportedSchema("$ref", ref, "its grammar rule name is taken")
        return name

    def visit(self, schema: dict, name: str) -> str:
        rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
        kind = schema.get("type")
        if not schema:
            return self._add_rule(rule_name, self._add_primitive("value", PRIMITIVE_RULES["value"]))
        if kind == "string" and ("minLength" in schema or "maxLength" in schema):
            char = self._add_primitive("char", PRIMITIVE_RULES["char"])
            body = _repeat(char, schema["minLength"], schema["maxLength"])
            return self._add_rule(rule_name, rf'"\"" {body} "\"" space')
        if kind == "array" and "items" in schema:
            item = self.visit(schema["items"], f"{name}{'-' if name else ''}item")
            body = _repeat(item, schema["minItems"], schema["maxItems"], '"," space')
            return self._add_rule(rule_name, f'"[" space {body} "]" space'.replace("space  ", "space "))
        return super().visit(schema, name)
