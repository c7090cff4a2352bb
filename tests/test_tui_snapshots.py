"""The four screens at 80x24 against committed SVG snapshots (pytest-textual-snapshot).

Figures that change from run to run (speed, memory, clock) are not on these screens: the chat shows a
conversation restored from the history with fixed timestamps, and its memory line is pinned; the models
screen sees only the embedded model. Update after a deliberate change: pytest tests/test_tui_snapshots.py
--snapshot-update, then look at the SVGs.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams
from edgellm.session import ChatSession
from edgellm.tui.app import ChatApp
from edgellm.tui.history import History, Message
from edgellm.tui.widgets import StatusBar

SIZE = (80, 24)
FIXED_TIME = 1767355200.0  # 2 Jan 2026: the sidebar shows a date, not a clock


@pytest.fixture
def restored_app(fresh_engine: Engine, tmp_path: Path, monkeypatch) -> ChatApp:
    for name in ("models", "dev-models", "hf"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("EDGELLM_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("EDGELLM_DEV_MODELS", str(tmp_path / "dev-models"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    history = History(tmp_path / "history.sqlite")
    conversation = history.create("SmolLM2-135M-Instruct")
    history.add(conversation, Message("user", "Write a Python function that adds two numbers."))
    history.add(conversation, Message("assistant", "Here it is:\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n"
                                                   "It returns the **sum** of `a` and `b`."))
    history.db.execute("UPDATE conversations SET updated_at = ?", (FIXED_TIME,))
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=8)
    return ChatApp(session, history=history, resume=True)


async def pin_figures(pilot) -> None:
    pilot.app.chat.query_one(StatusBar).show("SmolLM2-135M-Instruct · ready", "RAM (live figures vary) · KV 0/2,048")
    await pilot.pause()


def test_chat_screen(snap_compare, restored_app: ChatApp):
    assert snap_compare(restored_app, terminal_size=SIZE, run_before=pin_figures)


def test_chat_screen_with_the_sidebar(snap_compare, restored_app: ChatApp):
    assert snap_compare(restored_app, press=["ctrl+b"], terminal_size=SIZE, run_before=pin_figures)


def test_help_screen(snap_compare, restored_app: ChatApp):
    assert snap_compare(restored_app, press=["f1"], terminal_size=SIZE, run_before=pin_figures)


def test_models_screen(snap_compare, restored_app: ChatApp):
    assert snap_compare(restored_app, press=["f2"], terminal_size=SIZE, run_before=pin_figures)


def test_quantize_screen(snap_compare, restored_app: ChatApp):
    assert snap_compare(restored_app, press=["f3"], terminal_size=SIZE, run_before=pin_figures)
