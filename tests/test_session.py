"""The async interface the TUI uses: records arrive as the engine decodes; closing early cancels."""

import asyncio
import threading
from contextlib import aclosing

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.runtime.backend import llama_thread
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams
from edgellm.session import ChatSession
from tests.support.threads import DecodeAhead


async def test_asend_streams_and_keeps_history(fresh_engine: Engine):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=24, system="Be brief.")
    records = [r async for r in session.asend("Name a planet.")]
    assert records[-1].finish_reason in ("eog", "length")
    reply = "".join(r.text for r in records)
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    second = [r async for r in session.asend("Another one?")]
    assert second[-1].stats.reused_tokens > 0  # the first turn stayed in the KV cache


async def test_closing_the_stream_cancels_generation(fresh_engine: Engine):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=400)
    stream = session.asend("Write a long story about a dragon.")
    taken = []
    async for record in stream:
        taken.append(record.text)
        if len(taken) == 3:
            break
    await stream.aclose()
    prompt_len = len(llama_thread().submit(fresh_engine.chat_tokens, session.messages[:1]).result(60))
    assert len(fresh_engine.kv_tokens) < prompt_len + 20  # stopped within a few tokens, not 400
    # the partial reply is kept: the records taken, not what the decode made before it saw the cancel
    assert session.messages[-1] == {"role": "assistant", "content": "".join(taken)}
    # the engine is free again: a new turn runs
    records = [r async for r in ChatSession(fresh_engine, max_tokens=4).asend("Hi")]
    assert records[-1].stats.generated_tokens >= 1


def test_failed_turn_leaves_history_unchanged(smollm2):
    from edgellm.runtime.engine import LoadOptions

    with Engine(smollm2, LoadOptions(n_ctx=64)) as small:
        session = ChatSession(small, max_tokens=4)
        with pytest.raises(EdgeLLMError, match="context holds"):
            list(session.send("word " * 400))
        assert session.messages == []


async def test_a_stopped_frame_stream_keeps_the_frames_it_handed_out(fresh_engine: Engine, monkeypatch):
    decode = DecodeAhead(fresh_engine, monkeypatch)
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=400)
    shown: list[str] = []
    async with aclosing(session.asend_frames("Write a long story about a dragon.", frame_s=0.05)) as frames:
        async for frame in frames:
            shown.extend(r.text for r in frame)
            if len(shown) >= 3:
                await decode.run_ahead(len(shown))  # records the stop must not keep: made, never handed out
                break
    assert decode.made > len(shown)
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[-1]["content"] == "".join(shown)


def test_a_sync_reply_closed_early_keeps_what_was_taken(fresh_engine: Engine):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=400)

    def take_three() -> list[str]:  # as the line-mode chat does, on the thread that runs llama.cpp
        stream = session.send("Write a long story about a dragon.")
        taken = [next(stream).text for _ in range(3)]
        stream.close()
        return taken

    taken = llama_thread().submit(take_three).result(60)
    assert session.messages[-1] == {"role": "assistant", "content": "".join(taken)}


async def test_the_history_is_one_list_for_two_threads(fresh_engine: Engine, monkeypatch):
    """The UI thread replaces and reads the history while the llama thread makes a reply: reads are
    snapshots, and the reply joins whatever the history is when it ends."""
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=16)
    decoding, go_on = threading.Event(), threading.Event()
    real_chat = fresh_engine.chat

    def paused_chat(messages, **kwargs):  # on the llama thread: it waits once for the UI side
        records = real_chat(messages, **kwargs)
        first = next(records)
        decoding.set()
        assert go_on.wait(60)
        yield first
        yield from records

    monkeypatch.setattr(fresh_engine, "chat", paused_chat)
    stream = session.asend("Name a planet.")
    first = asyncio.ensure_future(anext(stream))
    try:
        assert await asyncio.get_running_loop().run_in_executor(None, decoding.wait, 60)
        snapshot = session.messages
        assert snapshot == [{"role": "user", "content": "Name a planet."}]
        snapshot.append({"role": "user", "content": "not in the session"})
        assert session.messages == [{"role": "user", "content": "Name a planet."}]  # a copy: the session's is as it was
        session.messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a planet."}]
    finally:
        go_on.set()  # a failed check leaves the llama thread free
    records = [await first] + [r async for r in stream]
    reply = "".join(r.text for r in records)
    assert session.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Name a planet."},
                                {"role": "assistant", "content": reply}]
