"""The conversations, newest first, with a search box; picking one posts `ConversationList.Picked`."""

from __future__ import annotations

import time

from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, Label, ListItem, ListView

from edgellm.tui.history import Conversation


def when(t: float) -> str:
    return time.strftime("%H:%M" if time.time() - t < 86400 else "%d %b", time.localtime(t))


class ConversationList(Vertical):
    class Picked(Message):
        def __init__(self, conversation_id: int) -> None:
            super().__init__()
            self.conversation_id = conversation_id

    class Searched(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def compose(self) -> ComposeResult:
        yield Input(placeholder="Search chats", id="search")
        yield ListView(id="chats")

    def show(self, conversations: list[Conversation], current: int | None) -> None:
        view = self.query_one("#chats", ListView)
        view.clear()
        items = [ListItem(Label(f"{c.title}\n[dim]{when(c.updated_at)} · {c.model}[/]", markup=True),
                          name=str(c.id)) for c in conversations]
        view.extend(items)
        index = next((i for i, c in enumerate(conversations) if c.id == current), None)
        if index is not None:
            view.index = index

    @on(ListView.Selected, "#chats")
    def picked(self, event: ListView.Selected) -> None:
        if event.item.name:
            self.post_message(self.Picked(int(event.item.name)))

    @on(Input.Changed, "#search")
    def searched(self, event: Input.Changed) -> None:
        self.post_message(self.Searched(event.value))
