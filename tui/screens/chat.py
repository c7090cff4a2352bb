"""The chat: a sidebar of conversations, the messages, the status bar and the message box.

Replies stream in a worker (the decode runs on the llama thread; the UI takes one frame of records
every `frame_s`). Every completed message is committed to the history as it completes; a stopped reply
(Esc, Ctrl+C, quitting) is kept and marked "stopped": the frames shown, the text saved and the session's
next prompt are the same records.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import TYPE_CHECKING, ClassVar

import psutil
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Tab, Tabs
from textual.worker import WorkerCancelled

from edgellm.decoding.records import Record
from edgellm.errors import EdgeLLMError
from edgellm.remote.split import SplitEngine
from edgellm.tui.history import Message
from edgellm.tui.threads import on_llama_thread
from edgellm.tui.widgets import Bubble, ConversationList, Notice, PromptArea, StatusBar
from edgellm.tui.widgets.status import memory_summary, reply_summary

if TYPE_CHECKING:
    from edgellm.tui.app import ChatApp

OPEN_TABS = 6  # chats open side by side (the sidebar has them all)
TAB_CHARS = 18
SIDEBAR_MIN_WIDTH = 120  # narrower terminals start with the sidebar hidden (Ctrl+B shows it)
MIN_SIZE = (60, 16)
STOP_WAIT_S = 30.0  # a reply stops at its next token; one that has not by then is reported


class ChatScreen(Screen):
    CSS_PATH = "chat.tcss"
    # A reply is rendered 5 times a second, with the tokens of one frame at once: on 2 cores every frame
    # takes the decode's time (benchmarks/tui.py: 0.96x of `edgellm run` at 5 fps, 0.87-0.90x at 10).
    frame_s = 1 / 5
    # not Ctrl+D/E/Y/K/U/W/A: the message box's own editing keys
    BINDINGS: ClassVar[list[Binding]] = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+n", "new_chat", "New"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+o", "edit_last", "Edit last"),
        Binding("ctrl+g", "copy_reply", "Copy"),
        Binding("ctrl+b", "toggle_sidebar", "Chats"),
        Binding("f5", "toggle_drafts", "Drafts", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self._reply_worker = None
        self._stop = False
        self.show_drafts = False
        self.last_record: Record | None = None
        self.open_tabs: list[int] = []  # conversation ids, the most recently opened last
        self._tabs_shown: list[tuple[str, str]] = []
        self._tabs_settling: str | None = None  # the tab a rebuild is about to activate

    @property
    def chat_app(self) -> ChatApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="body"):
            yield ConversationList(id="sidebar")
            with Vertical(id="main"):
                yield Tabs(id="tabs")
                yield VerticalScroll(id="conversation")
                yield StatusBar("loading the model…", id="status")
                yield PromptArea(id="prompt", disabled=True)
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#sidebar").display = self.app.size.width >= SIDEBAR_MIN_WIDTH
        self.refresh_list()
        await self.show_conversation()

    # -- what is shown --------------------------------------------------------------------------------
    def refresh_list(self, search: str = "") -> None:
        app = self.chat_app
        current = app.conversation.id if app.conversation else None
        conversations = app.history.conversations(search)
        self.query_one(ConversationList).show(conversations, current)
        if current is not None and current not in self.open_tabs:
            self.open_tabs = [*self.open_tabs, current][-OPEN_TABS:]
        every = conversations if not search else app.history.conversations()
        self.call_later(self.sync_tabs, {c.id: c.title for c in every}, current)

    async def sync_tabs(self, titles: dict[int, str], current: int | None) -> None:
        """One tab per open chat; switching tabs switches chats (each keeps its KV cache)."""
        tabs = self.query_one("#tabs", Tabs)
        self.open_tabs = [i for i in self.open_tabs if i in titles]
        wanted = [(f"c{i}", titles[i][:TAB_CHARS]) for i in self.open_tabs]
        target = f"c{current}" if current is not None else None
        if wanted != self._tabs_shown:
            # rebuilding activates tabs on its own: those events are not the user's picks
            self._tabs_settling = target
            await tabs.clear()
            for tab_id, label in wanted:
                await tabs.add_tab(Tab(label, id=tab_id))
            self._tabs_shown = wanted
        tabs.display = len(wanted) > 1
        if target is not None and tabs.active != target:
            self._tabs_settling = target
            tabs.active = target

    @on(Tabs.TabActivated, "#tabs")
    async def tab_picked(self, event: Tabs.TabActivated) -> None:
        picked = event.tab.id if event.tab is not None else None
        if self._tabs_settling is not None:
            if picked == self._tabs_settling:
                self._tabs_settling = None
            return
        app = self.chat_app
        if picked is None or (app.conversation is not None and f"c{app.conversation.id}" == picked):
            return
        await self.open(int(picked[1:]))

    async def show_conversation(self) -> None:
        """The current conversation's messages (or the welcome notice of a new chat)."""
        app = self.chat_app
        conversation = self.query_one("#conversation", VerticalScroll)
        await conversation.remove_children()
        messages = app.conversation.messages if app.conversation else []
        widgets = [Bubble(m.role, m.content, m.status, markdown=not self.show_drafts)
                   for m in messages if m.role != "system"]
        if not widgets and app.session is not None:
            widgets = [Notice(app.welcome(), id="welcome")]
        if widgets:
            await conversation.mount_all(widgets)
        conversation.scroll_end(animate=False)

    async def ready(self) -> None:
        """The model is loaded: the message box opens."""
        app = self.chat_app
        await self.show_conversation()
        self.status(f"{app.session.engine.info.name} · ready")
        await self.show_memory()
        prompt = self.query_one(PromptArea)
        prompt.disabled = False
        prompt.focus()

    def unready(self, line: str | None = None) -> None:
        """No model for now (another is loading): the message box closes."""
        if line is not None:
            self.status(line)
        self.query_one(PromptArea).disabled = True

    def status(self, line: str) -> None:
        self.query_one(StatusBar).show(line)

    async def show_memory(self) -> None:
        session = self.chat_app.session
        if session is None:
            return
        engine = session.engine

        def measure() -> tuple[int, int, int]:  # the KV state's size is a llama.cpp call
            draft = getattr(session.speculator, "draft_engine", None)
            if isinstance(engine, SplitEngine):  # the KV cache is its child's
                return 0, 0, 0
            return engine.seq.nbytes, len(engine.kv_tokens), draft.info.size_bytes if draft else 0

        try:
            kv_bytes, kv_tokens, draft_bytes = await on_llama_thread(measure, what="measuring the KV cache")
        except EdgeLLMError:
            return
        self.query_one(StatusBar).show(memory=memory_summary(
            engine.info.size_bytes, kv_bytes, draft_bytes, psutil.Process().memory_info().rss, kv_tokens,
            engine.n_ctx))

    def on_resize(self) -> None:
        if (self.app.size.width, self.app.size.height) < MIN_SIZE:
            self.app.notify(f"the terminal is {self.app.size.width}×{self.app.size.height}; the chat needs "
                            f"{MIN_SIZE[0]}×{MIN_SIZE[1]}: make the window larger", severity="warning")

    # -- sending and streaming ------------------------------------------------------------------------
    @on(PromptArea.Submitted)
    def submitted(self, event: PromptArea.Submitted) -> None:
        text = event.text.strip()
        if not text or self.chat_app.session is None or self.streaming:
            return
        event.prompt.clear()
        self.send(text)

    @property
    def streaming(self) -> bool:
        return self._reply_worker is not None

    def send(self, text: str, record_user: bool = True) -> None:
        app = self.chat_app
        conversation = app.ensure_conversation()
        if record_user:
            app.history.add(conversation, Message("user", text))
        box = self.query_one("#conversation", VerticalScroll)
        for welcome in self.query("#welcome"):
            welcome.remove()
        if record_user:
            box.mount(Bubble("user", text))
        reply = Bubble("assistant", markdown=not self.show_drafts)
        box.mount(reply)
        box.scroll_end(animate=False)
        self.status("thinking…")
        self._stop = False
        self._reply_worker = self.stream_reply(text, reply)
        self.refresh_list()

    @work(exclusive=True, group="reply")
    async def stream_reply(self, text: str, reply: Bubble) -> None:
        app = self.chat_app
        assert app.session is not None and app.conversation is not None
        conversation, box = app.conversation, self.query_one("#conversation", VerticalScroll)
        prompt = self.query_one(PromptArea)
        prompt.cursor_blink = False  # a blinking cursor is two repaints a second taken from the decode
        # The new bubbles' layout and paint are done before the decode starts, not beside it.
        painted = asyncio.Event()
        self.call_after_refresh(painted.set)
        await painted.wait()
        last: Record | None = None
        status, error = "stopped", None
        shown: list[str] = []  # what the session keeps too: every frame taken is shown
        notes: list[str] = []
        try:
            async with aclosing(app.session.asend_frames(text, self.frame_s)) as frames:
                async for frame in frames:
                    shown.extend(r.text for r in frame)
                    if reply.append_records(frame):
                        box.scroll_end(animate=False)
                    for event in (r.event for r in frame if r.event):
                        self.status(event)  # memory pressure: what was given up; a worker gone
                        notes.append(event)
                    last = frame[-1]
                    if self._stop:
                        break
                else:
                    status = "complete"
        except EdgeLLMError as e:
            status, error = "error", str(e)
        finally:  # also on cancellation (quitting mid-reply): what was written is kept
            content = "".join(shown)  # the records as made (the bubble drops control characters)
            if error is not None:
                reply.body.append(f"[{error}]")
                reply.add_class("error")
                content = reply.plain
            reply.finish(status)
            stats = last.stats.as_dict() if last is not None else None
            app.history.add(conversation, Message("assistant", content, status, stats))
            prompt.cursor_blink = True
            self._reply_worker = None
        if status == "error":
            self.status(f"error: {error}")
        elif status == "stopped":
            self.status("stopped (the reply so far is kept)")
        elif last is not None:
            self.last_record = last
            self.status(" · ".join([reply_summary(last), *notes[-1:]]))  # the last note stays in view
        await self.show_memory()
        self.refresh_list()

    async def stop_and_wait(self) -> None:
        """Stop a streaming reply at the next frame and wait until it is saved."""
        if self._reply_worker is not None:
            self._stop = True
        await self.reply_done()

    async def reply_done(self, timeout: float = STOP_WAIT_S) -> None:
        """Wait until the streaming reply, if any, ends and is saved; past `timeout` the status line says so."""
        worker = self._reply_worker
        if worker is None:
            return
        waiting = asyncio.ensure_future(worker.wait())
        waiting.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, if no one waits any more
        try:  # shielded: giving up waiting must not cancel the worker, which saves the reply
            await asyncio.wait_for(asyncio.shield(waiting), timeout)
        except WorkerCancelled:  # quitting cancelled it; its `finally` saved the reply
            pass
        except TimeoutError:
            if self.is_mounted:  # not while the app closes
                self.status(f"the reply did not end within {timeout:g} s")

    # -- actions --------------------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self._reply_worker is not None:
            self._stop = True

    async def action_new_chat(self) -> None:
        await self.stop_and_wait()
        await self.chat_app.new_conversation()
        await self.show_conversation()
        self.refresh_list()
        self.status("new conversation")

    async def action_regenerate(self) -> None:
        """The last reply again, from the same user message."""
        app = self.chat_app
        if self.streaming or app.conversation is None or app.session is None:
            return
        messages = app.conversation.messages
        if not messages or messages[-1].role != "assistant":
            return
        user = next(i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user")
        text = messages[user].content
        app.history.remove_from(app.conversation, user + 1)
        app.sync_session(upto=user)  # the session re-adds the user message as it sends
        bubbles = list(self.query(Bubble))
        if bubbles and bubbles[-1].role == "assistant":
            await bubbles[-1].remove()
        self.send(text, record_user=False)

    async def action_edit_last(self) -> None:
        """The last user message back in the box; it and what followed leave the conversation."""
        app = self.chat_app
        if self.streaming or app.conversation is None:
            return
        messages = app.conversation.messages
        user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
        if user is None:
            return
        text = messages[user].content
        app.history.remove_from(app.conversation, user)
        app.sync_session()
        shown = [b for b in self.query(Bubble)]
        for bubble in shown[len([m for m in messages if m.role != "system"]):]:
            await bubble.remove()
        prompt = self.query_one(PromptArea)
        prompt.text = text
        prompt.focus()
        self.status("editing the last message: Enter sends it again")

    def action_copy_reply(self) -> None:
        replies = [b for b in self.query(Bubble) if b.role == "assistant"]
        if replies:
            self.app.copy_to_clipboard(replies[-1].plain)  # OSC 52: works over SSH in most terminals
            self.app.notify("reply copied to the clipboard")

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one("#sidebar")
        sidebar.display = not sidebar.display

    def action_toggle_drafts(self) -> None:
        self.show_drafts = not self.show_drafts
        for bubble in self.query(Bubble):
            bubble.show_drafts(self.show_drafts)
        self.status("drafted tokens shown in green" if self.show_drafts else "replies as Markdown")

    @on(ConversationList.Picked)
    async def picked(self, event: ConversationList.Picked) -> None:
        await self.open(event.conversation_id)

    async def open(self, conversation_id: int) -> None:
        await self.stop_and_wait()
        await self.chat_app.open_conversation(conversation_id)
        await self.show_conversation()
        self.refresh_list()
        self.status(f"{self.chat_app.conversation.title}")

    @on(ConversationList.Searched)
    def searched(self, event: ConversationList.Searched) -> None:
        self.refresh_list(event.text)
