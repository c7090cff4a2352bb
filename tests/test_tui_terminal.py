"""`edgellm chat` in a real terminal: tmux where installed (send-keys, capture-pane), else a
pseudo-terminal read through pyte. Type, see the reply, quit, reopen with --resume, see the conversation."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.support.terminal import Terminal


@pytest.fixture
def terminal(tmp_path: Path, no_local_models: dict[str, str]):
    env = {**no_local_models, "EDGELLM_DATA": str(tmp_path / "data")}
    opened: list[Terminal] = []

    def start(*args: str) -> Terminal:
        t = Terminal([sys.executable, "-m", "edgellm.cli", "chat", *args], env, f"edgellm-{os.getpid()}-{len(opened)}")
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def test_chat_in_a_real_terminal_keeps_the_conversation_across_a_restart(terminal):
    first = terminal("--temp", "0", "-n", "24")
    first.wait_for(lambda s: "ready" in s)
    first.type("What is the capital of France?")
    first.key("Enter")
    screen = first.wait_for(lambda s: "t/s" in s and "first token" in s)
    assert "assistant" in screen and "Paris" in screen
    first.key("C-q")
    first.wait_for(lambda s: "Paris" not in s, timeout=30)  # the app has left the screen

    again = terminal("--resume")
    screen = again.wait_for(lambda s: "ready" in s)
    assert "What is the capital of France?" in screen and "Paris" in screen
    again.key("C-q")
