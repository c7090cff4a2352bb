"""Quantize: the same pipeline as `edgellm quantize` (quantize/pipeline.py), with a bar per stage.

It runs on the llama thread (a reply waits for it, and it for a reply), reports each stage as it goes,
and Cancel stops it at the next tensor or stage with nothing left under the output name. The result is
written to the models dir, so the models screen lists it.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, ProgressBar, Static

from edgellm.errors import EdgeLLMError
from edgellm.models import models_dir
from edgellm.runtime.backend import llama_thread

BUDGET = re.compile(r"\s*[0-9.]+\s*(bpw|[kmgt]i?b)\s*", re.IGNORECASE)  # 300MB, 1.2GB, 4.5bpw
STAGE_WORDS = {"convert": "1/5 converting to F16", "importance matrix": "2/5 importance matrix",
               "plan": "3/5 planning the size budget", "quantize": "4/5 quantizing", "report": "5/5 measuring quality"}


def make_job(source: str, kind: str, calibration: str):
    """The form -> a QuantizeJob: a folder (or repo id, downloaded), a type or a size budget."""
    from edgellm.commands.quantize import HUB_PATTERNS
    from edgellm.models import looks_like_repo, snapshot
    from edgellm.quantize.pipeline import QuantizeJob, parse_budget

    source, kind = source.strip(), kind.strip() or "Q4_K_M"
    if not source:
        raise EdgeLLMError("give a Hugging Face model folder or repo id")
    src = Path(source).expanduser()
    if not src.is_dir():
        if not looks_like_repo(source):
            raise EdgeLLMError(f"{source}: no such folder, and not a repo id (owner/name)")
        src = snapshot(source, None, HUB_PATTERNS)
    budget = parse_budget(kind) if BUDGET.fullmatch(kind) else None
    calibration_path = Path(calibration).expanduser() if calibration.strip() else None
    if calibration_path is not None and not calibration_path.is_file():
        raise EdgeLLMError(f"calibration file {calibration_path} not found")
    suffix = kind.replace(" ", "") if budget is not None else kind.upper()
    out = models_dir() / f"{src.name}-{suffix}.gguf"
    return QuantizeJob(src, out, "Q4_K_M" if budget else kind.upper(), *(budget or (None, None)),
                       calibration=calibration_path, force=True)


class QuantizeScreen(Screen):
    CSS_PATH = "quantize.tcss"
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("f4", "app.switch_mode('chat')", "Back to chat"),
        Binding("escape", "cancel", "Cancel / back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._cancel: threading.Event | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="quantize-body"):
            yield Label("Model: a Hugging Face folder (config.json, *.safetensors, tokenizer.json) or repo id")
            yield Input(placeholder="~/models/SmolLM2-135M-Instruct or owner/name", id="source")
            with Horizontal(classes="row"):
                yield Input(value="Q4_K_M", placeholder="Q4_K_M, Q8_0… or a budget: 300MB, 4.5bpw", id="kind")
                yield Input(placeholder="calibration text (optional)", id="calibration")
            with Horizontal(classes="row"):
                yield Button("Quantize", id="start", variant="primary")
                yield Button("Cancel", id="cancel", disabled=True)
            yield Label("", id="stage")
            yield ProgressBar(id="progress", show_eta=False)
            yield Static("", id="report")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#progress").display = False

    @on(Button.Pressed, "#start")
    def start(self) -> None:
        if self._cancel is None:
            self.run_job(self.query_one("#source", Input).value, self.query_one("#kind", Input).value,
                         self.query_one("#calibration", Input).value)

    @on(Button.Pressed, "#cancel")
    def cancel_pressed(self) -> None:
        self.action_cancel()

    def action_cancel(self) -> None:
        if self._cancel is not None:
            self._cancel.set()
            self.query_one("#stage", Label).update("cancelling…")
        else:
            self.app.switch_mode("chat")

    @work(exclusive=True, group="quantize")
    async def run_job(self, source: str, kind: str, calibration: str) -> None:
        from edgellm.quantize.pipeline import Cancelled, run

        stage, bar, report = self.query_one("#stage", Label), self.query_one("#progress", ProgressBar), \
            self.query_one("#report", Static)
        self._cancel = cancel = threading.Event()
        self.query_one("#start", Button).disabled, self.query_one("#cancel", Button).disabled = True, False
        report.update("")
        bar.display = True

        def progress(name: str, done: int | None, total: int | None) -> None:
            def show() -> None:
                stage.update(STAGE_WORDS[name])
                bar.update(total=total, progress=done or 0)
            self.app.call_from_thread(show)

        loop = asyncio.get_running_loop()
        try:
            job = await loop.run_in_executor(None, make_job, source, kind, calibration)
            stage.update(f"quantizing {job.source.name} → {job.out.name}")
            result = await loop.run_in_executor(llama_thread(), run, job, progress, cancel)
        except Cancelled as e:
            stage.update(str(e))
        except EdgeLLMError as e:
            stage.update(f"error: {e}")
        else:
            size = result.out.stat().st_size / 1e6
            stage.update(f"done: {result.out} ({size:,.0f} MB, {result.qtype}) · listed under Models (F2)")
            lines = [result.mix] if result.mix else []
            if result.quality is not None:
                lines += result.quality.lines()
            report.update("\n".join(lines))
        finally:
            self._cancel = None
            bar.display = False
            self.query_one("#start", Button).disabled, self.query_one("#cancel", Button).disabled = False, True
