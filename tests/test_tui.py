"""The Textual chat driven with Pilot, over the real engine."""

import asyncio
import re
from contextlib import aclosing
from pathlib import Path

import pytest

from edgellm.decoding.records import Record, Stats
from edgellm.model_defaults import resolve_defaults
from edgellm.runtime.backend import llama_thread
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams
from edgellm.session import ChatSession
from edgellm.tui.app import ChatApp
from edgellm.tui.history import History
from edgellm.tui.widgets import Bubble, Notice, PromptArea, StatusBar
from tests.support.threads import DecodeAhead


@pytest.fixture
def history(tmp_path: Path) -> History:
    return History(tmp_path / "history.sqlite")


def make_app(session: ChatSession, history: History, **kwargs) -> ChatApp:
    return ChatApp(session, history=history, **kwargs)


async def wait_for_reply(app: ChatApp, pilot) -> None:
    await app.chat.reply_done(timeout=120)
    assert not app.chat.streaming, "the reply did not finish"
    await pilot.pause()


def status_text(app: ChatApp) -> str:
    return app.query_one(StatusBar).line


async def start_long_reply(app: ChatApp, pilot, seconds: float = 0.8) -> None:
    """Ask for a long story and let it stream for a moment (the reply is mid-way when this returns)."""
    app.query_one(PromptArea).text = "Write a very long story about a lighthouse by the sea."
    app.query_one(PromptArea).focus()
    await pilot.press("enter")
    await pilot.pause(seconds)


async def type_and_send(app: ChatApp, pilot, text: str) -> None:
    app.query_one(PromptArea).text = text
    app.query_one(PromptArea).focus()
    await pilot.press("enter")
    await wait_for_reply(app, pilot)


async def test_send_a_message_and_see_the_reply_stream(fresh_engine: Engine, history: History):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=32)
    app = make_app(session, history)
    async with app.run_test(size=(100, 40)) as pilot:
        await pilot.click("#prompt")
        await pilot.press(*"Name a fruit.")
        await pilot.press("enter")
        await wait_for_reply(app, pilot)
        bubbles = list(app.query(Bubble))
        assert [b.role for b in bubbles] == ["user", "assistant"]
        assert bubbles[0].plain == "Name a fruit."
        assert bubbles[1].plain.strip()
        assert bubbles[1].plain == session.messages[-1]["content"]
        status = status_text(app)
        assert "t/s" in status and "tokens" in status and "first token" in status
        assert app.query_one(PromptArea).text == ""
        assert "RAM" in app.query_one(StatusBar).memory and "KV" in app.query_one(StatusBar).memory
    (stored,) = history.conversations()
    assert [(m.role, m.status) for m in history.load(stored.id).messages] == [("user", "complete"),
                                                                              ("assistant", "complete")]
    assert stored.title == "Name a fruit." and history.load(stored.id).messages[1].content == bubbles[1].plain


async def test_second_turn_reuses_the_cache_and_new_chat_clears(fresh_engine: Engine, history: History):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=16)
    app = make_app(session, history)
    async with app.run_test(size=(100, 40)) as pilot:
        for text in ("Hi!", "How are you?"):
            await type_and_send(app, pilot, text)
        assert len(app.query(Bubble)) == 4
        assert re.search(r"\((\d+) reused\)", status_text(app)) and "(0 reused)" not in status_text(app)
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert len(app.query(Bubble)) == 0
        assert session.messages == []


async def test_escape_stops_a_long_reply_and_keeps_it_marked(fresh_engine: Engine, history: History):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=2000)
    app = make_app(session, history)
    async with app.run_test(size=(100, 40)) as pilot:
        await start_long_reply(app, pilot)
        await pilot.press("escape")
        await wait_for_reply(app, pilot)
        assert "stopped" in status_text(app)
        await pilot.pause(0.5)
        assert len(fresh_engine.kv_tokens) < 1000  # generation ended well before max_tokens
        reply = list(app.query(Bubble))[-1]
        assert reply.status == "stopped" and reply.plain and "stopped" in reply.border_title
    (stored,) = history.conversations()
    last = history.load(stored.id).messages[-1]
    assert (last.role, last.status, last.content) == ("assistant", "stopped", reply.plain)


async def test_first_screen_shows_the_settings_and_a_better_model_and_the_reply_says_why_it_ended(
        fresh_engine: Engine, history: History):
    defaults = resolve_defaults(fresh_engine.info, seed=0)
    session = ChatSession(fresh_engine, defaults.sampling, max_tokens=256, system=defaults.system)
    app = make_app(session, history, defaults=defaults, embedded=True)
    async with app.run_test(size=(100, 40)) as pilot:
        welcome = str(app.query_one("#welcome", Notice).render())
        assert "chat model" in welcome
        assert "temperature 0.2" in welcome and "(SmolLM2-135M-Instruct (embedded): measured" in welcome
        assert "repeat last n 64 (llama.cpp)" in welcome
        assert "edgellm pull Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF" in welcome
        await type_and_send(app, pilot, "What is the capital of France?")
        reply = list(app.query(Bubble))[-1].plain
        assert "Paris" in reply
        status = status_text(app)
        assert re.search(r"\d+ tokens · \d+\.\d t/s", status) and status.endswith("end of turn")


async def test_a_reply_shows_its_lines_once_and_no_blank_line_between_its_parts(fresh_engine: Engine,
                                                                                  history: History):
    """A bubble keeps finished paragraphs and the streaming tail in two parts; together they show the
    text as it is, while streaming and after."""
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=8)
    app = make_app(session, history)
    async with app.run_test(size=(100, 40)) as pilot:
        bubble = Bubble("assistant", "one\ntwo\n\nthree", markdown=False)
        await app.query_one("#conversation").mount(bubble)
        await pilot.pause()
        assert bubble.size.height == 4  # four lines of content: one blank between the paragraphs
        stream = Bubble("assistant", markdown=False)
        await app.query_one("#conversation").mount(stream)
        await pilot.pause()
        lines = "".join(f"line {i}\n" for i in range(20))
        stream.append_records([Record(lines, 1, Stats())])
        await pilot.pause()
        assert stream._live.styles.min_height is not None  # room reserved while streaming
        stream.finish()
        await pilot.pause()
        assert stream.size.height == 21 and stream.plain == lines  # 20 lines and the empty one after the last newline


async def test_a_finished_reply_is_markdown_with_its_code_highlighted(fresh_engine: Engine, history: History):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=8)
    app = make_app(session, history)
    async with app.run_test(size=(100, 40)) as pilot:
        text = "# Fibonacci\n\nIn **Python**:\n\n```python\ndef fib(n):\n    return n\n```\n"
        bubble = Bubble("assistant", text)
        await app.query_one("#conversation").mount(bubble)
        await pilot.pause()
        shown = app.export_screenshot()
        assert "Fibonacci" in shown and "fib" in shown
        assert "```" not in shown and "**Python**" not in shown  # rendered, not shown as source
        await pilot.press("f5")  # drafted tokens shown: plain text, markers and all
        await pilot.pause()
        assert "```" in app.export_screenshot().replace("&#160;", " ")


class StopsLate(ChatSession):
    """The UI's frames pass through here. It says when the first one is on screen, and once the UI stops
    taking frames it lets the decode run ahead before the cancel lands: records made, never shown."""

    def __init__(self, *args, decode: DecodeAhead, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.decode = decode
        self.first_frame_shown = asyncio.Event()

    async def asend_frames(self, text: str, frame_s: float = 0.1):
        taken = 0
        async with aclosing(super().asend_frames(text, frame_s)) as frames:
            try:
                async for frame in frames:
                    taken += len(frame)
                    yield frame
                    self.first_frame_shown.set()  # the UI asks for the next frame once this one is shown
            except GeneratorExit:  # the UI stopped taking frames
                await self.decode.run_ahead(taken)
                raise


async def test_a_stopped_reply_is_the_same_text_on_screen_in_the_history_and_in_the_next_prompt(
        fresh_engine: Engine, history: History, monkeypatch):
    decode = DecodeAhead(fresh_engine, monkeypatch)
    session = StopsLate(fresh_engine, SamplingParams.greedy_params(), max_tokens=2000, decode=decode)
    app = make_app(session, history)
    async with app.run_test(size=(100, 40)) as pilot:
        app.query_one(PromptArea).text = "Write a very long story about a lighthouse by the sea."
        app.query_one(PromptArea).focus()
        await pilot.press("enter")
        await session.first_frame_shown.wait()
        await pilot.press("escape")
        await wait_for_reply(app, pilot)
        reply = list(app.query(Bubble))[-1]
        stored = history.load(app.conversation.id).messages[-1]
        assert (stored.role, stored.status) == ("assistant", "stopped") and stored.content
        assert stored.content == reply.plain == session.messages[-1]["content"]
        session.max_tokens = 4
        await type_and_send(app, pilot, "Go on.")
    # the next turn's prompt, as the KV cache holds it, carries the reply as it was shown
    shown = [{"role": "user", "content": "Write a very long story about a lighthouse by the sea."},
             {"role": "assistant", "content": stored.content}, {"role": "user", "content": "Go on."}]
    prompt = llama_thread().submit(fresh_engine.chat_tokens, shown).result(60)
    assert fresh_engine.kv_tokens[:len(prompt)] == prompt
