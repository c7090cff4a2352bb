"""One message in the conversation; an assistant's grows as records stream in, then shows as Markdown."""

from __future__ import annotations

from collections.abc import Iterable

from rich.markdown import Markdown
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from edgellm.decoding.records import Record

DRAFT_STYLE = "bold green"  # tokens accepted from a speculative draft
LIVE_LINES = 12  # a streaming tail longer than this hands its finished paragraphs to the done part
RESERVED_LINES = 6  # room the tail keeps ahead of the text while streaming


class Bubble(Vertical):
    """A message in the conversation.

    Streaming is made cheap for the decode running beside it: the text is held in two parts, the
    paragraphs that are done and a live tail, so a frame re-renders only the tail; and the tail reserves
    a few lines ahead, so the screen's layout (a full repaint) is redone every few lines, not every frame.
    On 2 cores a layout per frame cost the decode about 10% of its speed. A finished assistant message is
    shown once as Markdown (code blocks highlighted), unless the drafted tokens are being shown.
    """

    def __init__(self, role: str, text: str = "", status: str = "complete", markdown: bool = True) -> None:
        super().__init__(classes=f"bubble {role}")
        self.role = role
        self.body = Text(text)
        self.status = status
        self.markdown = markdown and role == "assistant"
        self.border_title = role if status == "complete" else f"{role} · {status}"
        self._done, self._live = Static(classes="done"), Static(classes="live")
        self._cut = 0  # body[:_cut] is in the done part
        self._reserved = 0  # lines the live part holds room for while streaming
        self.streaming = False

    def compose(self) -> ComposeResult:
        yield self._done
        yield self._live

    def on_mount(self) -> None:
        self.finish()

    def append(self, text: str, from_draft: bool = False) -> None:
        self.body.append(text, style=DRAFT_STYLE if from_draft else None)
        self.finish()

    def append_records(self, records: Iterable[Record]) -> bool:
        """One frame's worth of tokens, rendered once. Returns whether the bubble grew (scroll to it)."""
        self.streaming = True
        for record in records:
            if record.text:
                self.body.append(record.text, style=DRAFT_STYLE if record.from_draft else None)
        tail = self.body[self._cut:]
        lines = self._wrapped_lines(tail)
        if lines > LIVE_LINES and "\n" in tail.plain:  # the finished paragraphs move to the done part
            self._cut += tail.plain.rfind("\n") + 1
            self._done.update(self.body[:self._cut - 1])  # its last newline is the break between the parts
            self._done.display = True
            tail = self.body[self._cut:]
            lines = self._wrapped_lines(tail)
        elif lines <= self._reserved:
            self._live.update(tail, layout=False)
            return False
        self._reserved = lines + RESERVED_LINES
        self._live.styles.min_height = self._reserved
        self._live.update(tail)
        return True

    def finish(self, status: str | None = None) -> None:
        """Show the whole text with no reserved room (the end of a reply, or a message shown at once)."""
        self.streaming = False
        if status is not None:
            self.status = status
            self.border_title = self.role if status == "complete" else f"{self.role} · {status}"
            self.set_class(status != "complete", "marked")
        self._reserved = 0
        self._live.styles.min_height = None
        if self.markdown and self.body.plain.strip():
            self._cut = len(self.body)
            self._done.display = False
            self._live.update(Markdown(self.body.plain, code_theme=self.code_theme))
            return
        self._cut = self.body.plain.rfind("\n") + 1
        self._done.update(self.body[:max(0, self._cut - 1)])  # its last newline is the break between the parts
        self._done.display = self._cut > 0
        self._live.update(self.body[self._cut:])

    def show_drafts(self, show: bool) -> None:
        """Coloured drafted tokens (plain text) or Markdown, for a finished assistant message."""
        if self.role == "assistant" and not self.streaming:
            self.markdown = not show
            self.finish()

    @property
    def code_theme(self) -> str:
        return "monokai" if self.app.current_theme.dark else "default"

    def _wrapped_lines(self, text: Text) -> int:
        width = self._live.content_size.width or self.content_size.width
        return len(text.wrap(self.app.console, width)) if width > 0 else 1

    @property
    def plain(self) -> str:
        return self.body.plain


class Notice(Static):
    """A line of information in the conversation: the model in use, its settings, how to get a better one."""
