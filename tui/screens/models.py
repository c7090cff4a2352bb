"""Models: what is on this machine and whether it fits, pulling from the hub, and the chat's settings.

The table is `edgellm models` (size, architecture, quantization, context) with the planner's header
estimate of a chat's memory against what this machine has free. Enter on a row chats with that model.
A pull runs `edgellm pull` in a subprocess (Cancel kills it; the hub cache resumes the download next
time); its progress is the size of the file being written. The draft, system prompt and sampling are
the current conversation's, stored with it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import psutil
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Header, Input, Label, ProgressBar, Select

from edgellm.errors import EdgeLLMError
from edgellm.memory.plan import margin
from edgellm.models import LocalModel, list_local
from edgellm.tui.settings import DRAFT_CHOICES, ChatSettings

if TYPE_CHECKING:
    from edgellm.tui.app import ChatApp

MIB = 1 << 20


def fits_text(needs: int, free: int) -> str:
    return "yes" if needs <= free else f"no ({needs / MIB:,.0f} > {free / MIB:,.0f} MiB)"


def settings_from(values: dict[str, str], base: ChatSettings) -> ChatSettings:
    """The form's text -> settings, each value checked (one line naming the field when it is not valid)."""
    def number(name: str, kind: type, low: float, high: float, inclusive: bool = True):
        text = values[name].strip()
        try:
            value = kind(text)
        except ValueError:
            raise EdgeLLMError(f"{name.replace('_', ' ')}: {text!r} is not a number") from None
        if not (low <= value <= high) or (not inclusive and value == low):
            raise EdgeLLMError(f"{name.replace('_', ' ')} must be {'at least' if inclusive else 'above'} {low:g} "
                               f"and at most {high:g} (got {value:g})")
        return value

    return replace(base, system=values["system"].strip() or None,
                   temperature=number("temperature", float, 0.0, 100.0),
                   top_p=number("top_p", float, 0.0, 1.0, inclusive=False),
                   max_tokens=number("max_tokens", int, 1, 1 << 20))


class ModelsScreen(Screen):
    CSS_PATH = "models.tcss"
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("f4,escape", "app.switch_mode('chat')", "Back to chat"),
        Binding("ctrl+l", "refresh_models", "Rescan"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.models: list[LocalModel] = []
        self._pull: asyncio.subprocess.Process | None = None

    @property
    def chat_app(self) -> ChatApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="models-body"):
            yield DataTable(id="models", cursor_type="row", zebra_stripes=True)
            with Horizontal(classes="row"):
                yield Input(placeholder="Pull: owner/repo from the hub", id="repo")
                yield Button("Pull", id="pull", variant="primary")
                yield Button("Cancel", id="cancel-pull", disabled=True)
            yield ProgressBar(id="pull-progress", show_eta=False)
            yield Label("", id="pull-status")
            with Horizontal(classes="row"):
                yield Label("Draft", classes="field")
                yield Select([(c, c) for c in DRAFT_CHOICES], id="draft", allow_blank=False, value="auto")
                yield Label("Temp", classes="field")
                yield Input(id="temperature", classes="number")
                yield Label("Top-p", classes="field")
                yield Input(id="top_p", classes="number")
                yield Label("Max", classes="field")
                yield Input(id="max_tokens", classes="number")
            with Horizontal(classes="row"):
                yield Input(placeholder="System prompt (empty: the model's own)", id="system")
                yield Button("Save", id="save-settings")
            yield Label("", id="settings-status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#models", DataTable)
        table.add_columns("NAME", "KIND", "SIZE", "NEEDS", "FITS", "ARCH", "QUANT", "CONTEXT")
        self.query_one("#pull-progress").display = False
        self.action_refresh_models()

    def on_screen_resume(self) -> None:
        self.action_refresh_models()

    def action_refresh_models(self) -> None:
        from edgellm.commands.models import needs_bytes

        table = self.query_one("#models", DataTable)
        table.clear()
        self.models = list_local()
        available = psutil.virtual_memory().available
        free = available - margin(available)
        for m in self.models:
            if m.info is None:
                table.add_row(m.name, "-", "-", "-", "-", "-", "-", f"unreadable: {m.error}", key=m.name)
                continue
            needs = needs_bytes(m.info)
            table.add_row(m.name, m.kind, f"{m.info.size_bytes / MIB:,.0f} MiB", f"{needs / MIB:,.0f} MiB",
                          fits_text(needs, free), m.info.arch, m.info.file_type, f"{m.info.n_ctx_train:,}",
                          key=str(m.path))
        self.show_settings()

    def show_settings(self) -> None:
        app = self.chat_app
        s = app.settings.merged(app.conversation.settings) if app.conversation else app.settings
        choices = list(DRAFT_CHOICES)
        engine = app.session.engine if app.session else None
        if engine is not None:  # local models that can draft for the one loaded
            digest = engine.info.vocab_digest
            choices += [str(m.path) for m in self.models if m.info is not None and digest
                        and m.info.vocab_digest == digest and 2 * m.info.n_params <= engine.info.n_params]
        if s.draft not in choices:
            choices.append(s.draft)
        select = self.query_one("#draft", Select)
        select.set_options([(Path(c).stem if os.sep in c else c, c) for c in choices])
        select.value = s.draft
        self.query_one("#temperature", Input).value = f"{s.temperature:g}"
        self.query_one("#top_p", Input).value = f"{s.top_p:g}"
        self.query_one("#max_tokens", Input).value = str(s.max_tokens)
        self.query_one("#system", Input).value = s.system or ""

    # -- use a model ----------------------------------------------------------------------------------
    @on(DataTable.RowSelected, "#models")
    def use_model(self, event: DataTable.RowSelected) -> None:
        path = Path(str(event.row_key.value))
        if not path.is_file():
            self.notify(f"{path} cannot be read", severity="error")
            return
        self.chat_app.switch_model(path)
        self.chat_app.switch_mode("chat")

    # -- settings -------------------------------------------------------------------------------------
    @on(Button.Pressed, "#save-settings")
    def save_settings(self) -> None:
        app = self.chat_app
        values = {name: self.query_one(f"#{name}", Input).value
                  for name in ("system", "temperature", "top_p", "max_tokens")}
        try:
            settings = settings_from(values, app.settings)
        except EdgeLLMError as e:
            self.query_one("#settings-status", Label).update(f"not saved: {e}")
            return
        draft = str(self.query_one("#draft", Select).value)
        if draft != settings.draft:
            settings = replace(settings, draft=draft)
            app.change_draft(draft)
        app.save_settings(settings)
        self.query_one("#settings-status", Label).update("saved for this conversation and new ones")

    # -- pull -----------------------------------------------------------------------------------------
    @on(Button.Pressed, "#pull")
    @on(Input.Submitted, "#repo")
    def start_pull(self) -> None:
        repo = self.query_one("#repo", Input).value.strip()
        if not repo or self._pull is not None:
            return
        self.pull(repo)

    @work(exclusive=True, group="pull")
    async def pull(self, repo: str) -> None:
        bar, status = self.query_one("#pull-progress", ProgressBar), self.query_one("#pull-status", Label)
        bar.display, bar.total = True, None
        self.query_one("#cancel-pull", Button).disabled = False
        status.update(f"pulling {repo}…")
        loop = asyncio.get_running_loop()
        total = await loop.run_in_executor(None, download_size, repo)
        bar.total = total
        self._pull = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgellm.cli", "pull", repo, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            while True:
                try:
                    await asyncio.wait_for(self._pull.wait(), 0.25)
                    break
                except TimeoutError:
                    written = downloading_bytes()
                    if written:
                        bar.update(progress=written)
                        of = f" of {total / MIB:,.1f}" if total else ""
                        status.update(f"pulling {repo}: {written / MIB:,.1f}{of} MiB")
            out, err = await self._pull.communicate()
            if self._pull.returncode == 0:
                status.update(f"pulled: {out.decode().strip().splitlines()[-1] if out.strip() else repo}")
                self.action_refresh_models()
            elif self._pull.returncode < 0:
                status.update("pull cancelled; pulling again resumes the download")
            else:
                lines = err.decode(errors="replace").strip().splitlines()
                status.update(lines[-1] if lines else f"pull failed ({self._pull.returncode})")
        finally:
            self._pull = None
            bar.display = False
            self.query_one("#cancel-pull", Button).disabled = True

    @on(Button.Pressed, "#cancel-pull")
    def cancel_pull(self) -> None:
        if self._pull is not None and self._pull.returncode is None:
            self._pull.kill()


def download_size(repo: str) -> int | None:
    """Bytes of the GGUF `edgellm pull REPO` picks (None when the hub does not say: the bar then just moves)."""
    from huggingface_hub import HfApi

    from edgellm.models import _pick_gguf, hub_errors, looks_like_repo

    if not looks_like_repo(repo):
        return None
    try:
        with hub_errors(repo):
            sizes = {f.path: getattr(f, "size", None) for f in HfApi().list_repo_tree(repo, recursive=True)}
        size = sizes.get(_pick_gguf(list(sizes)))
        return int(size) if size else None
    except (EdgeLLMError, ValueError):
        return None  # the pull itself reports what went wrong


def downloading_bytes() -> int:
    """Bytes written so far of the hub downloads in progress (huggingface-hub's *.incomplete blobs)."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE)
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.glob("models--*/blobs/*.incomplete") if p.is_file())
