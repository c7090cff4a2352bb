"""Chat widgets: one bubble per message; the assistant's bubble grows as records stream in."""

from __future__ import annotations

from rich.text import Text
from textual.message import Message
from textual.widgets import Static

DRAFT_STYLE = "bold green"  # tokens accepted from a speculative draft


class Bubble(Static):
    """A message in the conversation."""

    def __init__(self, role: str, text: str = "") -> None:
        super().__init__(classes=f"bubble {role}")
        self.role = role
        self.body = Text(text)
        self.border_title = role

    def on_mount(self) -> None:
        self.update(self.body)

    def append(self, text: str, from_draft: bool = False) -> None:
        self.body.append(text, style=DRAFT_STYLE if from_draft else None)
        self.update(self.body)

    @property
    def plain(self) -> str:
        return self.body.plain


class StatusLine(Static):
    """Model name and the speed of the last reply."""

    def show(self, text: str) -> None:
        self.update(text)


class ReplyFinished(Message):
    """Posted when a reply ends (normally, stopped, or with an error)."""

    def __init__(self, finish_reason: str | None, summary: str) -> None:
        super().__init__()
        self.finish_reason = finish_reason
        self.summary = summary
