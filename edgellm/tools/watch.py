"""Streaming with tools: text goes out as it comes until it may be the start of a call, which is held
until the reply ends and parse.py has read it."""

from __future__ import annotations

from edgellm.tools.declare import Tool
from edgellm.tools.parse import OPENERS, Parsed, parse


class CallWatch:
    """`feed` a reply's pieces and get the text safe to send now; `finish` for the rest: (text, calls)."""

    def __init__(self, tools: list[Tool], hold_all: bool = False) -> None:
        self.tools, self.hold_all = tools, hold_all
        self.text = ""
        self.sent = 0
        self.held_from: int | None = 0 if hold_all else None

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.held_from is None:
            self.held_from = self._call_start()
        end = self.held_from if self.held_from is not None else len(self.text) - self._partial_opener()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _call_start(self) -> int | None:
        """Where a call may begin: a reply that opens with JSON, or an opener tag anywhere."""
        stripped = self.text.lstrip()
        if not stripped:
            return None
        if stripped[0] in "{[":
            return self.sent  # the blanks before it were held too (_partial_opener)
        found = [i for i in (self.text.find(o) for o in OPENERS) if i >= 0]
        return min(found) if found else None

    def _partial_opener(self) -> int:
        """How many trailing characters may be the beginning of an opener tag (or leading blanks)."""
        if not self.text.strip():
            return len(self.text)  # blank so far: a JSON call may follow
        for n in range(min(len(self.text), max(map(len, OPENERS)) - 1), 0, -1):
            tail = self.text[-n:]
            if any(o.startswith(tail) for o in OPENERS):
                return n
        return 0

    def finish(self) -> tuple[str, Parsed]:
        """(text still to send, the parse of the whole reply)."""
        parsed = parse(self.text, self.tools)
        sent = self.text[:self.sent]
        if not parsed.calls:
            return self.text[self.sent:], parsed
        rest = parsed.content[len(sent):] if parsed.content.startswith(sent) else ""
        return rest, parsed
