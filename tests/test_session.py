"""The async interface the TUI uses: records arrive as the engine decodes; closing early cancels."""

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams
from edgellm.session import ChatSession


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
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    prompt_len = len(fresh_engine.chat_tokens(session.messages[:1]))
    assert len(fresh_engine.kv_tokens) < prompt_len + 20  # stopped within a few tokens, not 400
    assert session.messages[-1]["role"] == "assistant"  # the partial reply is kept
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
