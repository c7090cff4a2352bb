"""`edgellm chat` on a terminal: a Textual app over the same engine and ChatSession as the CLI.

The engine loads in a worker thread; replies stream through `ChatSession.asend`, the async interface
that the tests drive too. Escape stops a reply, Ctrl+N starts a new conversation.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer, Header, Input

from ..engine import Engine, LoadOptions, Record
from ..errors import EdgeLLMError
from ..sampling import SamplingParams
from ..session import ChatSession
from ..speculative.setup import make_speculator
from .widgets import Bubble, ReplyFinished, StatusLine


def summarize(record: Record) -> str:
    s = record.stats
    text = (f"{s.generated_tokens} tokens · {s.decode_tps:.1f} t/s · prompt {s.prompt_tokens} "
            f"({s.reused_tokens} reused) · {record.finish_reason}")
    if s.drafted_tokens:
        text += (f" · draft accepted {s.acceptance:.0%} ({s.mean_accepted:.1f}/step)"
                 f" · ~{s.speedup:.2f}x")
    return text


class ChatApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "edgellm chat"
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, session: ChatSession | None = None, *, model: Path | None = None,
                 options: LoadOptions | None = None, session_args: dict | None = None) -> None:
        """Pass a ready `session`, or a `model` to load in the background (with `session_args`)."""
        super().__init__()
        self.session = session
        self._model, self._options = model, options
        self._session_args = session_args or {}
        self._reply_worker = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="conversation")
        yield StatusLine("loading the model…", id="status")
        yield Input(placeholder="Message (Enter to send)", id="prompt", disabled=self.session is None)
        yield Footer()

    def on_mount(self) -> None:
        if self.session is None:
            self.load_engine()
        else:
            self.engine_ready()

    @work(thread=True, exclusive=True, group="load")
    def load_engine(self) -> None:
        try:
            engine = Engine(self._model, self._options)
        except EdgeLLMError as e:
            self.call_from_thread(self.exit, 1, 1, f"edgellm: {e}")
            return
        args = dict(self._session_args)
        try:
            speculator = make_speculator(engine, args.pop("draft", "off"))
        except EdgeLLMError as e:
            self.call_from_thread(self.exit, 1, 1, f"edgellm: {e}")
            return
        self.session = ChatSession(engine, speculator=speculator, **args)
        self.call_from_thread(self.engine_ready)

    def engine_ready(self) -> None:
        assert self.session is not None
        self.sub_title = self.session.engine.info.name
        self.query_one(StatusLine).show(f"{self.session.engine.info.name} · ready")
        prompt = self.query_one("#prompt", Input)
        prompt.disabled = False
        prompt.focus()

    @on(Input.Submitted, "#prompt")
    def send(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.session is None or self._reply_worker is not None:
            return
        event.input.value = ""
        conversation = self.query_one("#conversation", VerticalScroll)
        conversation.mount(Bubble("user", text))
        reply = Bubble("assistant")
        conversation.mount(reply)
        conversation.scroll_end(animate=False)
        self.query_one(StatusLine).show("thinking…")
        self._reply_worker = self.stream_reply(text, reply)

    @work(exclusive=True, group="reply")
    async def stream_reply(self, text: str, reply: Bubble) -> None:
        assert self.session is not None
        conversation = self.query_one("#conversation", VerticalScroll)
        last: Record | None = None
        try:
            async for last in self.session.asend(text):
                if last.text:
                    reply.append(last.text, last.from_draft)
                    conversation.scroll_end(animate=False)
        except EdgeLLMError as e:
            reply.add_class("error")
            reply.append(f"[{e}]")
            self.post_message(ReplyFinished("error", str(e)))
            return
        finally:
            self._reply_worker = None
        if last is not None:
            self.post_message(ReplyFinished(last.finish_reason, summarize(last)))

    def on_reply_finished(self, message: ReplyFinished) -> None:
        self.query_one(StatusLine).show(message.summary)

    def action_stop(self) -> None:
        if self._reply_worker is not None:
            self._reply_worker.cancel()
            self._reply_worker = None
            self.query_one(StatusLine).show("stopped")

    def action_new_chat(self) -> None:
        if self.session is None:
            return
        self.action_stop()
        self.session.reset()
        self.query_one("#conversation", VerticalScroll).remove_children()
        self.query_one(StatusLine).show("new conversation")


def run_app(model: Path, options: LoadOptions, sampling: SamplingParams, max_tokens: int,
            system: str | None, stop: tuple[str, ...] = (), draft: str = "off") -> int:
    app = ChatApp(model=model, options=options, session_args={
        "sampling": sampling, "max_tokens": max_tokens, "system": system, "stop": stop, "draft": draft})
    return app.run() or 0
