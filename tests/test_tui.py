"""The Textual chat driven with Pilot, over the real engine."""

from textual.widgets import Input

from edgellm.engine import Engine
from edgellm.sampling import SamplingParams
from edgellm.session import ChatSession
from edgellm.tui.app import ChatApp
from edgellm.tui.widgets import Bubble, StatusLine


async def wait_for_reply(app: ChatApp, pilot) -> None:
    for _ in range(600):
        await pilot.pause(0.05)
        if app._reply_worker is None:
            return
    raise AssertionError("the reply did not finish")


async def test_send_a_message_and_see_the_reply_stream(fresh_engine: Engine):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=32)
    app = ChatApp(session)
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
        status = str(app.query_one(StatusLine).render())
        assert "t/s" in status and "tokens" in status
        assert app.query_one("#prompt", Input).value == ""


async def test_second_turn_reuses_the_cache_and_new_chat_clears(fresh_engine: Engine):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=16)
    app = ChatApp(session)
    async with app.run_test(size=(100, 40)) as pilot:
        for text in ("Hi!", "How are you?"):
            app.query_one("#prompt", Input).value = text
            await pilot.press("enter")
            await wait_for_reply(app, pilot)
        assert len(app.query(Bubble)) == 4
        assert "reused" in str(app.query_one(StatusLine).render())
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert len(app.query(Bubble)) == 0
        assert session.messages == []


async def test_escape_stops_a_long_reply(fresh_engine: Engine):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=2000)
    app = ChatApp(session)
    async with app.run_test(size=(100, 40)) as pilot:
        app.query_one("#prompt", Input).value = "Write a very long story about the sea."
        await pilot.press("enter")
        await pilot.pause(0.5)
        await pilot.press("escape")
        await wait_for_reply(app, pilot)
        assert "stopped" in str(app.query_one(StatusLine).render())
        await pilot.pause(0.5)
        assert len(fresh_engine.kv_tokens) < 1000  # generation ended well before max_tokens
