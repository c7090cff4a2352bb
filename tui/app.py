"""`edgellm chat` on a terminal: the App routes between screens and holds the runtime and the history.

Screens: chat (the default), models (F2), quantize (F3), help (F1 or ?, over the others). The engine
loads in a worker on the llama thread behind the chat's "loading" line; replies stream through
`ChatSession.asend_frames`, which the tests drive too.

Threads: the UI thread owns the app's state (the session, the model it holds); every llama.cpp call,
and every close of an engine or a speculator, is a job on the llama thread (threads.on_llama_thread),
awaited with a timeout. Jobs run in order, so a close runs after the reply that used what it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.worker import Worker

from edgellm.errors import EdgeLLMError
from edgellm.memory.manager import Loaded, ModelManager, process_manager
from edgellm.memory.pressure import default_watch
from edgellm.model_defaults import Defaults
from edgellm.models import BETTER_MODEL_PULL
from edgellm.options import FLAGS, LOOKUP_DRAFTS, Planned, planned_chat
from edgellm.remote.split import SplitEngine
from edgellm.runtime import kvfile
from edgellm.runtime.backend import favour_this_thread, llama_thread
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.session import ChatSession
from edgellm.speculative.setup import make_speculator
from edgellm.tui.history import Conversation, History
from edgellm.tui.screens.chat import ChatScreen
from edgellm.tui.screens.help import HelpScreen
from edgellm.tui.screens.models import ModelsScreen
from edgellm.tui.screens.quantize import QuantizeScreen
from edgellm.tui.settings import ChatSettings
from edgellm.tui.threads import LLAMA_WAIT_S, on_llama_thread

KV_FILES_KEPT = 8  # conversations whose KV cache stays on disk (SmolLM2: ~23 KB a token)


class ChatApp(App[int]):
    TITLE = "edgellm chat"
    DEFAULT_MODE = "chat"
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("f2", "switch_mode('models')", "Models"),
        Binding("f3", "switch_mode('quantize')", "Quantize"),
        Binding("f4", "switch_mode('chat')", "Chat", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("ctrl+c", "stop_or_quit", "Stop the reply; quit when none runs", show=False, priority=True),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, session: ChatSession | None = None, *, model: Path | None = None,
                 options: LoadOptions | None = None, settings: ChatSettings | None = None,
                 defaults: Defaults | None = None, embedded: bool = False, notes: list[str] | None = None,
                 loader: Callable[[], Engine] | None = None, history: History | None = None,
                 resume: bool = False, draft_gpu_layers: int = 0, stop: tuple[str, ...] = (),
                 prepare: Callable[[], tuple[Path, Planned, Defaults, bool]] | None = None,
                 manager: ModelManager | None = None, workers: dict[str, str | None] | None = None) -> None:
        """Pass a ready `session`, or a `model` to load in the background (with `settings`).

        `workers`: `--rpc` and `--ram` as `edgellm chat` was given them, for every model picked later too;

        `defaults`: the sampling settings in force and their sources, shown on a new chat;
        `embedded`: the model is the small embedded one, so a new chat says how to get a better one;
        `notes`: what the memory plan changed to make the load fit;
        `loader`: how to get the engine (the model manager's), instead of loading `model` with `options`;
        `resume`: open the most recent conversation;
        `prepare`: what `edgellm chat` does before loading (pick the model, plan its memory), run in the
        loading worker so the first frame does not wait for it; it gives the model, plan and defaults;
        `manager`: the model manager planned loads go through (the process's by default).
        """
        super().__init__()
        self.session = session
        if settings is None:
            settings = (ChatSettings.from_sampling(session.sampling, session.system, session.max_tokens, "off")
                        if session is not None else ChatSettings())
        self.settings = settings
        self._stop_strings = stop
        self._draft_gpu_layers = draft_gpu_layers
        self._defaults, self._embedded = defaults, embedded
        self._notes = notes or []
        self._loader: Callable[[], Engine | Loaded] = loader or functools.partial(Engine, model, options)
        self.manager = manager if manager is not None else process_manager()
        # where the session's engine came from: the manager's (released when it goes) or loaded here (closed)
        self._held: Loaded | Engine | None = None
        self._prepare = prepare
        self._rpc_flags = {k: v for k, v in (workers or {}).items() if v is not None}
        self._load_lock = asyncio.Lock()  # loads and draft changes take turns; none is cut short mid-way
        self.loading: Worker | None = None  # the last load started: its worker ends when the model is ready or refused
        self._owns_history = history is None
        self.history = history if history is not None else History()
        self.chat = ChatScreen()
        self.add_mode("chat", lambda: self.chat)
        self.add_mode("models", ModelsScreen)
        self.add_mode("quantize", QuantizeScreen)
        self.conversation: Conversation | None = self.history.last() if resume else None
        if self.history.moved_aside is not None:
            self._notes.append(f"the chat history was unreadable; it was moved to {self.history.moved_aside} "
                               "and a new one started")

    async def on_mount(self) -> None:
        # The decode thread needs the GIL for a moment between tokens; while this thread renders a frame
        # it would wait up to the default 5 ms switch interval, with the cores idle.
        sys.setswitchinterval(0.001)
        if self.session is None:
            self.loading = self.load_engine(self._prepare)
            self._prepare = None
        else:
            await self.engine_ready()

    @work(group="load")
    async def load_engine(self, prepare: Callable[[], tuple[Path, Planned, Defaults, bool]] | None = None) -> None:
        """The model (`prepare`'s plan first, when given) in place of the one loaded, on the llama thread."""
        async with self._load_lock:
            try:
                if prepare is not None:  # the plan's dry run is a llama.cpp call too
                    self.use_plan(*await on_llama_thread(prepare, what="planning the model"))
                # The old model goes before the new one loads: both may not fit, and once released it is the
                # manager's to evict (or to unload when its keep-alive runs out).
                await self.chat.stop_and_wait()
                if self.session is not None:
                    self.chat.unready()
                await self._retire_session()
                held, speculator = await on_llama_thread(
                    self._load, self._loader, self.settings.draft, self._draft_gpu_layers,
                    what="loading the model", dispose=self._let_go_loaded)
            except EdgeLLMError as e:  # the app stays: another model can be picked
                self.chat.status(f"could not load the model: {e}")
                self.notify(f"{e}\nF2 lists the models on this machine; pick one that fits.",
                            title="model not loaded", severity="error", timeout=30)
                return
            self._held = held
            engine = held.engine if isinstance(held, Loaded) else held
            favour_this_thread()  # keystrokes are echoed at once while a reply decodes on every core
            self.session = ChatSession(engine, self.settings.sampling, self.settings.max_tokens,
                                       self.settings.system, self._stop_strings, speculator=speculator)
            await self.engine_ready()

    def _load(self, loader: Callable[[], Engine | Loaded], draft: str, draft_gpu_layers: int) -> tuple[Any, Any]:
        """(llama thread) The engine and its speculator; a speculator that fails gives the model back."""
        held = loader()
        engine = held.engine if isinstance(held, Loaded) else held
        if isinstance(engine, SplitEngine):
            return held, None  # its child drafts by lookup where that pays
        try:
            speculator = make_speculator(engine, draft, draft_gpu_layers=draft_gpu_layers, watch=default_watch())
        except BaseException:
            self._let_go(None, held)
            raise
        return held, speculator

    def _let_go(self, speculator: Any, held: Loaded | Engine | None) -> None:
        """(llama thread) Close a speculator and give back a model: the manager's is released (kept for its
        keep-alive, evicted sooner when a load needs the room), one loaded here is closed."""
        try:
            if speculator is not None:
                speculator.close()
        finally:
            if isinstance(held, Loaded):
                self.manager.release(held)
            elif held is not None:
                held.close()

    def _let_go_loaded(self, loaded: tuple[Any, Any]) -> None:
        held, speculator = loaded  # a load whose worker was cancelled (a quit) or gave up waiting
        self._let_go(speculator, held)

    async def _retire_session(self) -> None:
        """No session from now on; its speculator is closed and its model given back on the llama thread,
        after the jobs handed over before (a reply that still runs there)."""
        session, held = self.session, self._held
        self.session, self._held = None, None
        if session is None:
            return

        def end() -> None:
            speculator, session.speculator = session.speculator, None
            self._let_go(speculator, held)

        await on_llama_thread(end, what="closing the model")

    def use_plan(self, path: Path, planned: Planned, defaults: Defaults, embedded: bool) -> None:
        """`edgellm chat`'s choices: load this model with this plan and these sampling defaults."""
        self._loader = functools.partial(self.manager.acquire, planned.path, planned.request, plan=planned.plan,
                                         **planned.extra)
        if planned.split:  # held by a child process: a lost worker costs a pause, not the conversation
            self._loader = planned.load_split
        self._draft_gpu_layers = planned.draft_gpu_layers
        self._defaults, self._embedded = defaults, embedded
        self._notes = [*planned.plan.notes, *self._notes]
        self.settings = ChatSettings.from_sampling(defaults.sampling, defaults.system, self.settings.max_tokens,
                                                   planned.draft)

    def switch_model(self, path: Path) -> Worker:
        """Chat with another model from now on: `edgellm chat PATH`'s plan and sampling defaults, worked out
        in the loading worker (the dry run and the draft scan take a second)."""
        from edgellm.commands.chat import prepare

        # a lookup choice carries over; a draft model was the old model's: the plan finds one anew
        draft = self.settings.draft if self.settings.draft in LOOKUP_DRAFTS else "auto"
        self._notes = []
        self.chat.status(f"loading {path.name}…")
        flags = FLAGS.namespace(model=str(path), draft=draft, **self._rpc_flags)
        self.loading = self.load_engine(functools.partial(prepare, flags, path))
        return self.loading

    @work(group="load")
    async def change_draft(self, draft: str) -> None:
        """A new draft choice for the loaded model (auto: the plan picks one that fits)."""
        async with self._load_lock:
            session = self.session
            if session is None:
                return
            try:
                chosen = await on_llama_thread(self._swap_draft, session, draft, what="changing the draft")
            except EdgeLLMError as e:
                self.notify(str(e), title="draft not changed", severity="error")
                return
            self.chat.status(f"draft: {chosen}")

    @staticmethod
    def _swap_draft(session: ChatSession, draft: str) -> str:
        """(llama thread, so between two replies) Plan the draft, make its speculator, close the old one."""
        if isinstance(session.engine, SplitEngine):
            return "off here: the split model's child drafts by lookup where that pays"
        planned = planned_chat(session.engine.path, draft)
        speculator = make_speculator(session.engine, planned.draft, draft_gpu_layers=planned.draft_gpu_layers,
                                     watch=default_watch())
        old, session.speculator = session.speculator, speculator
        if old is not None:
            old.close()
        return planned.draft

    async def engine_ready(self) -> None:
        assert self.session is not None
        self.sub_title = self.session.engine.info.name
        if self.conversation is not None:
            await self.open_conversation(self.conversation.id)
        await self.chat.ready()

    def welcome(self) -> str:
        assert self.session is not None
        engine = self.session.engine
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
        lines.append("F1 help · F2 models · F3 quantize · Ctrl+B chats · Ctrl+J new line")
        return "\n".join(lines)

    # -- conversations --------------------------------------------------------------------------------
    def ensure_conversation(self) -> Conversation:
        if self.conversation is None:
            model = self.session.engine.info.name if self.session else ""
            self.conversation = self.history.create(model, self.settings.as_dict())
        return self.conversation

    async def new_conversation(self) -> None:
        await self.park_kv()
        self.conversation = None
        if self.session is not None:
            try:
                await on_llama_thread(self.session.engine.reset, what="emptying the KV cache")
            except EdgeLLMError as e:
                self.chat.status(str(e))
        self.apply_settings(self.settings)

    async def open_conversation(self, conversation_id: int) -> None:
        if self.conversation is not None and self.conversation.id != conversation_id:
            await self.park_kv()
        self.conversation = self.history.load(conversation_id)
        self.apply_settings(self.settings.merged(self.conversation.settings))
        await self.restore_kv(conversation_id)

    # -- each conversation's KV cache, kept on disk while another is shown ----------------------------
    def kv_path(self, conversation_id: int) -> Path:
        return self.history.path.parent / "kv" / f"{conversation_id}.kv"

    async def park_kv(self) -> None:
        """The shown conversation's KV cache to disk, so that coming back to it prefills nothing again."""
        if self.session is None or self.conversation is None or isinstance(self.session.engine, SplitEngine):
            return  # a split model's KV cache is its child's
        engine, path = self.session.engine, self.kv_path(self.conversation.id)

        def save() -> bool:
            tokens = list(engine.kv_tokens)  # read where the decode writes it
            if tokens:
                kvfile.save(engine, 0, tokens, path)
            return bool(tokens)

        try:
            if not await on_llama_thread(save, what="saving the KV cache"):
                return
        except EdgeLLMError:
            return  # it is prefilled again when the conversation comes back
        kept = sorted(path.parent.glob("*.kv"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KV_FILES_KEPT:]:
            kvfile.remove(old)

    async def restore_kv(self, conversation_id: int) -> None:
        path = self.kv_path(conversation_id)
        if self.session is None or not path.is_file() or isinstance(self.session.engine, SplitEngine):
            return
        engine = self.session.engine

        def load() -> None:
            engine.reset()
            try:
                engine.seq.tokens = kvfile.load(engine, 0, path, engine.n_ctx)
            except EdgeLLMError:  # another model or other settings: the next reply prefills it
                engine.reset()

        try:
            await on_llama_thread(load, what="restoring the KV cache")
        except EdgeLLMError as e:
            self.chat.status(str(e))

    def apply_settings(self, settings: ChatSettings) -> None:
        """A conversation's system prompt and sampling into the session; its messages after them."""
        if self.session is not None:
            self.session.sampling, self.session.max_tokens = settings.sampling, settings.max_tokens
            self.session.system = settings.system
        self.sync_session()

    def sync_session(self, upto: int | None = None) -> None:
        """The session's messages = the conversation's (up to `upto`), less turns that failed."""
        if self.session is None:
            return
        messages = self.conversation.messages[:upto] if self.conversation else []
        chat = [m.as_chat() for i, m in enumerate(messages)
                if m.status != "error" and not (m.role == "user" and i + 1 < len(messages)
                                                and messages[i + 1].status == "error")]
        system = self.session.system
        if system and not any(m["role"] == "system" for m in chat):
            chat.insert(0, {"role": "system", "content": system})
        self.session.messages = chat

    def save_settings(self, settings: ChatSettings) -> None:
        """New settings for the current conversation (and the next new ones)."""
        self.settings = settings
        self.apply_settings(settings)
        if self.conversation is not None:
            self.conversation.settings = settings.as_dict()
            self.history.update(self.conversation)

    # -- actions --------------------------------------------------------------------------------------
    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    async def action_stop_or_quit(self) -> None:
        chat = self.chat
        if chat.streaming:
            chat.action_stop()
        else:
            await self.action_quit()

    async def action_quit(self) -> None:
        await self.chat.stop_and_wait()  # the reply so far is saved, marked stopped
        await self.park_kv()  # --resume continues without prefilling
        self.exit(0)

    async def on_unmount(self) -> None:
        self.workers.cancel_group(self, "load")  # what a load under way makes is let go when it is done
        await self.chat.stop_and_wait()  # the reply so far is saved before the history closes
        with contextlib.suppress(EdgeLLMError):  # too late to tell anyone: the job still runs
            await self._retire_session()
        if self._owns_history:
            self.history.close()


def run_app(prepare: Callable[[], tuple[Path, Planned, Defaults, bool]], resume: bool = False,
            max_tokens: int = FLAGS.max_tokens, stop: tuple[str, ...] = (),
            workers: dict[str, str | None] | None = None) -> int:
    """`edgellm chat` on a terminal: `prepare` (model, plan, defaults) runs behind the first frame."""
    try:
        return ChatApp(prepare=prepare, resume=resume, settings=ChatSettings(max_tokens=max_tokens), stop=stop,
                       workers=workers).run() or 0
    finally:
        # released models wait out their keep-alive: unloaded now, on the llama thread, not at interpreter exit
        with contextlib.suppress(TimeoutError):
            llama_thread().submit(process_manager().close).result(LLAMA_WAIT_S)
