"""Every key binding, read from the screens' own binding lists (so this page cannot drift from them)."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from edgellm.tui.widgets.prompt import NEWLINE_KEYS

EXTRA = [("enter", "Send the message"), (",".join(NEWLINE_KEYS), "New line in the message")]


def key_name(key: str) -> str:
    """"ctrl+n" -> "Ctrl+N", "f1,question_mark" -> "F1 / ?"."""
    out = []
    for k in key.split(","):
        k = {"question_mark": "?", "escape": "Esc", "enter": "Enter"}.get(k.strip(), k.strip())
        mods, _, last = k.rpartition("+")
        last = last.upper() if len(last) == 1 or (last[0] == "f" and last[1:].isdigit()) else last
        out.append("+".join([*(m.capitalize() for m in mods.split("+") if m), last]))
    return " / ".join(out)


def bindings_table() -> Table:
    from edgellm.tui.app import ChatApp
    from edgellm.tui.screens.chat import ChatScreen
    from edgellm.tui.screens.models import ModelsScreen
    from edgellm.tui.screens.quantize import QuantizeScreen

    table = Table(box=None, show_header=True, header_style="bold", expand=True)
    table.add_column("where", no_wrap=True)
    table.add_column("key", no_wrap=True)
    table.add_column("does")
    sections = [("anywhere", ChatApp.BINDINGS), ("chat", ChatScreen.BINDINGS), ("models", ModelsScreen.BINDINGS),
                ("quantize", QuantizeScreen.BINDINGS)]
    for where, bindings in sections:
        for b in bindings:
            if isinstance(b, Binding):
                table.add_row(where, key_name(b.key), b.description or b.action)
    for key, does in EXTRA:
        table.add_row("message box", key_name(key), does)
    return table


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "help.tcss"
    BINDINGS: ClassVar[list[Binding]] = [Binding("escape,f1,q,question_mark", "dismiss", "Close help")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static("[b]edgellm chat: keys[/b]  (Esc closes)", id="help-title")
            yield Static(bindings_table(), id="help-keys")
            yield Static("Replies are Markdown; F5 shows the tokens accepted from a speculative draft in "
                         "green instead. Chats are kept in SQLite in the data directory; "
                         "`edgellm chat --resume` reopens the last one.", id="help-notes")
