"""`edgellm chat` on a terminal: a Textual app over the same engine and ChatSession as the CLI.

The engine loads in a worker thread; replies stream through `ChatSession.asend`, the async interface
that the tests drive too. Escape stops a reply, Ctrl+N starts a new conversation.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer, Header, Input

from ..errors import EdgeLLMError
from ..memory.pressure import default_watch
from ..model_defaults import Defaults
from ..models import BETTER_MODEL_PULL
from ..options import Planned
from ..runtime.backend import llama_thread
from ..runtime.engine import Engine, LoadOptions, Record
from ..session import ChatSession
from ..speculative.setup import make_speculator
from .widgets import Bubble, Notice, ReplyFinished, StatusLine


def summarize(record: Record) -> str:
    s = record.stats
    text = (f"{s.generated_tokens} tokens · {s.decode_tps:.1f} t/s · prompt {s.prompt_tokens} "
            f"({s.reused_tokens} reused) · {record.finish_words}")
    if s.drafted_tokens:
        text += (f" · draft accepted {s.acceptance:.0%} ({s.mean_accepted:.1f}/step)"
                 f" · ~{s.speedup:.2f}x")
    return text


class ChatApp(App[int]):
    CSS_PATH = "app.tcss"
    # A reply is rendered 5 times a second, with the tokens of one frame at once: on 2 cores every frame
    # takes the decode's time (benchmarks/tui.py: 0.96x of `edgellm run` at 5 fps, 0.87-0.90x at 10).
    frame_s = 1 / 5
    TITLE = "edgellm chat"
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("escape", "stop", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, session: ChatSession | None = None, *, model: Path | None = None,
                 options: LoadOptions | None = None, session_args: dict | None = None,
                 defaults: Defaults | None = None, embedded: bool = False, notes: list[str] | None = None,
                 loader: Callable[[], Engine] | None = None) -> None:
        """Pass a ready `session`, or a `model` to load in the background (with `session_args`).

        `defaults`: the sampling settings in force and their sources, shown on the first screen;
        `embedded`: the model is the small embedded one, so the first screen says how to get a better one;
        `notes`: what the memory plan changed to make the load fit, shown on the first screen;
        `loader`: how to get the engine (the model manager's), instead of loading `model` with `options`.
        """
        super().__init__()
        self.session = session
        self._session_args = session_args or {}
        self._defaults, self._embedded = defaults, embedded
        self._notes = notes or []
        self._loader = loader or functools.partial(Engine, model, options)
        self._reply_worker = None
        self.last_record: Record | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield VerticalScroll(id="conversation")
        yield StatusLine("loading the model…", id="status")
        yield Input(placeholder="Message (Enter to send)", id="prompt", disabled=self.session is None)
        yield Footer()

    def on_mount(self) -> None:
        # The decode thread needs the GIL for a moment between tokens; while this thread renders a frame
        # it would wait up to the default 5 ms switch interval, with the cores idle.
        sys.setswitchinterval(0.001)
        if self.session is None:
            self.load_engine()
        else:
            self.engine_ready()

    @work(exclusive=True, group="load")
    async def load_engine(self) -> None:
        # on the thread that will decode: one OpenMP team for the process (backend.llama_thread)
        loop = asyncio.get_running_loop()
        args = dict(self._session_args)
        draft = args.pop("draft", "off")
        speculate = functools.partial(make_speculator, draft_gpu_layers=args.pop("draft_gpu_layers", 0),
                                      watch=default_watch())
        try:
            engine = await loop.run_in_executor(llama_thread(), self._loader)
            speculator = await loop.run_in_executor(llama_thread(), speculate, engine, draft)
        except EdgeLLMError as e:
            self.exit(1, 1, f"edgellm: {e}")
            return
        self.session = ChatSession(engine, speculator=speculator, **args)
        self.engine_ready()

    def engine_ready(self) -> None:
        assert self.session is not None
        engine = self.session.engine
        self.sub_title = engine.info.name
        self.query_one("#conversation", VerticalScroll).mount(Notice(self.welcome(engine), id="welcome"))
        self.query_one(StatusLine).show(f"{engine.info.name} · ready")
        prompt = self.query_one("#prompt", Input)
        prompt.disabled = False
        prompt.focus()

    def welcome(self, engine: Engine) -> str:
        lines = [f"{engine.info.name} · {'chat' if engine.is_chat_model else 'base'} model"]
        if not engine.is_chat_model:
            lines.append("No chat template: a base (completion) model. Messages go in ChatML and a reply "
                         "stops at its markers; a chat model answers questions better.")
        if self._defaults is not None:  # the settings in force, grouped by where they came from
            by_source: dict[str, list[str]] = {}
            for name, setting in self._defaults.as_dict().items():
                if name != "system":
                    by_source.setdefault(setting["source"], []).append(f"{name.replace('_', ' ')} {setting['value']}")
            lines.append("Sampling: " + "; ".join(f"{', '.join(v)} ({k})" for k, v in by_source.items()))
            if self._defaults.system:
                lines.append(f"System prompt: {self._defaults.system!r} ({self._defaults.system_source})")
        if self._embedded:
            lines.append(f"This is the small embedded model. For better answers, one command: {BETTER_MODEL_PULL}")
        lines += [f"Memory: {note}" for note in self._notes]
        return "\n".join(lines)

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
        event.input.cursor_blink = False  # a blinking cursor is two repaints a second taken from the decode
        self._reply_worker = self.stream_reply(text, reply)

    @work(exclusive=True, group="reply")
    async def stream_reply(self, text: str, reply: Bubble) -> None:
        assert self.session is not None
        conversation = self.query_one("#conversation", VerticalScroll)
        # The new bubbles' layout and paint are done before the decode starts, not beside it.
        painted = asyncio.Event()
        self.call_after_refresh(painted.set)
        await painted.wait()
        last: Record | None = None
        try:
            async with aclosing(self.session.asend_frames(text, self.frame_s)) as frames:
                async for frame in frames:
                    if reply.append_records(frame):
                        conversation.scroll_end(animate=False)
                    for event in (r.event for r in frame if r.event):
                        self.query_one(StatusLine).show(event)  # memory pressure: what was given up
                    last = frame[-1]
        except EdgeLLMError as e:
            reply.add_class("error")
            reply.append(f"[{e}]")
            self.post_message(ReplyFinished("error", str(e)))
            return
        finally:
            reply.finish()
            self.query_one("#prompt", Input).cursor_blink = True
            self._reply_worker = None
        if last is not None:
            self.last_record = last
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
        self.query(Bubble).remove()
        self.query_one(StatusLine).show("new conversation")


def run_app(model: Path, planned: Planned, defaults: Defaults, max_tokens: int,
            stop: tuple[str, ...] = (), embedded: bool = False) -> int:
    app = ChatApp(model=model, options=planned.options, loader=planned.load, defaults=defaults, embedded=embedded,
                  session_args={
        "sampling": defaults.sampling, "max_tokens": max_tokens, "system": defaults.system, "stop": stop,
        "draft": planned.draft, "draft_gpu_layers": planned.draft_gpu_layers}, notes=planned.plan.notes)
    return app.run() or 0
