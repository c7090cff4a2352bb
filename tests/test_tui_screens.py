"""The terminal UI's history, screens and bad states, driven with Pilot over real models and real SQLite."""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
import threading
from pathlib import Path

import pytest
from textual.widgets import Button, DataTable, Input, Label, ListView, Tab, Tabs

from edgellm.memory.manager import ModelManager
from edgellm.options import FLAGS, planned_chat
from edgellm.quantize.pipeline import STAGES, Cancelled, QuantizeJob, run
from edgellm.runtime.backend import llama_thread
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams
from edgellm.session import ChatSession
from edgellm.tui.app import ChatApp
from edgellm.tui.history import History, Message
from edgellm.tui.screens.help import HelpScreen
from edgellm.tui.settings import ChatSettings
from edgellm.tui.widgets import Bubble, PromptArea
from tests.dev_models import dev_model
from tests.support.threads import WatchedEngines, watched_speculator
from tests.test_quantize import tiny_checkpoint
from tests.test_tui import start_long_reply, status_text, type_and_send, wait_for_reply


def new_app(engine: Engine, db: Path, **kwargs) -> tuple[ChatApp, ChatSession]:
    session = ChatSession(engine, SamplingParams.greedy_params(), max_tokens=12)
    return ChatApp(session, history=History(db), **kwargs), session


async def test_history_survives_a_restart_and_resume_continues_it(fresh_engine: Engine, tmp_path: Path):
    db = tmp_path / "history.sqlite"
    app, _ = new_app(fresh_engine, db)
    async with app.run_test(size=(100, 30)) as pilot:
        await type_and_send(app, pilot, "My name is Ada.")
        first_reply = list(app.query(Bubble))[-1].plain
    fresh_engine.reset()
    app, session = new_app(fresh_engine, db, resume=True)  # a new app on the same database
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        shown = [(b.role, b.plain) for b in app.query(Bubble)]
        assert shown == [("user", "My name is Ada."), ("assistant", first_reply)]
        await type_and_send(app, pilot, "What is my name?")
        # the model saw the whole conversation: the earlier turn is in its prompt
        assert [m["content"] for m in session.messages[:2]] == ["My name is Ada.", first_reply]
    history = History(db)
    (conversation,) = history.conversations()
    assert [m.role for m in history.load(conversation.id).messages] == ["user", "assistant", "user", "assistant"]


async def test_regenerate_and_edit_the_last_message(fresh_engine: Engine, tmp_path: Path):
    app, session = new_app(fresh_engine, tmp_path / "h.sqlite")
    session.sampling = SamplingParams(temperature=1.0, seed=None)
    async with app.run_test(size=(100, 30)) as pilot:
        await type_and_send(app, pilot, "Tell me a word.")
        await pilot.press("ctrl+r")
        await wait_for_reply(app, pilot)
        conversation = app.history.load(app.conversation.id)
        assert [m.role for m in conversation.messages] == ["user", "assistant"]  # replaced, not added
        assert conversation.messages[1].content == list(app.query(Bubble))[-1].plain
        assert [b.role for b in app.query(Bubble)] == ["user", "assistant"]
        await pilot.press("ctrl+o")
        await pilot.pause()
        assert app.query_one(PromptArea).text == "Tell me a word."
        assert app.history.load(app.conversation.id).messages == [] and not app.query(Bubble)
        assert session.messages == []
        app.query_one(PromptArea).text = "Tell me a colour."
        await pilot.press("enter")
        await wait_for_reply(app, pilot)
        assert [m.content for m in app.history.load(app.conversation.id).messages][:1] == ["Tell me a colour."]


async def test_several_chats_in_the_sidebar_switch_and_search(fresh_engine: Engine, tmp_path: Path):
    app, session = new_app(fresh_engine, tmp_path / "h.sqlite")
    async with app.run_test(size=(120, 30)) as pilot:  # wide enough: the sidebar is shown
        await type_and_send(app, pilot, "First chat about apples.")
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert not app.query(Bubble)
        await type_and_send(app, pilot, "Second chat about boats.")
        chats = app.query_one("#chats", ListView)
        assert len(chats.children) == 2
        tabs = app.query_one("#tabs", Tabs)  # both chats open side by side: a tab each
        await pilot.pause(0.2)
        labels = [str(t.label) for t in tabs.query(Tab)]
        assert len(labels) == 2 and labels[0].startswith("First chat") and labels[1].startswith("Second chat")
        tabs.action_previous_tab()  # back to the first chat, as the keyboard does
        await pilot.pause(0.3)
        assert [b.plain for b in app.query(Bubble)][:1] == ["First chat about apples."]
        tabs.action_next_tab()
        await pilot.pause(0.3)
        assert [b.plain for b in app.query(Bubble)][:1] == ["Second chat about boats."]
        app.query_one("#search", Input).value = "apples"
        await pilot.pause(0.2)
        assert len(chats.children) == 1
        chats.index = 0
        chats.action_select_cursor()
        await pilot.pause(0.3)
        assert [b.plain for b in app.query(Bubble)][:1] == ["First chat about apples."]
        assert session.messages[0]["content"] == "First chat about apples."


async def test_help_lists_every_binding_and_closes(fresh_engine: Engine, tmp_path: Path):
    from rich.console import Console

    from edgellm.tui.screens.chat import ChatScreen
    from edgellm.tui.screens.help import bindings_table

    app, _ = new_app(fresh_engine, tmp_path / "h.sqlite")
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        assert "Esc" in app.export_screenshot()  # the first rows are on screen at 80x24; the rest scroll
        console = Console(width=100, record=True)
        console.print(bindings_table())
        listed = console.export_text()
        for binding in (*ChatScreen.BINDINGS, *ChatApp.BINDINGS):
            assert binding.description in listed, binding.description
        assert "Ctrl+J" in listed and "Ctrl+R" in listed and "F2" in listed
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


async def test_models_screen_lists_what_fits_and_keeps_settings_per_conversation(fresh_engine: Engine,
                                                                                 tmp_path: Path):
    app, session = new_app(fresh_engine, tmp_path / "h.sqlite")
    async with app.run_test(size=(120, 30)) as pilot:
        await type_and_send(app, pilot, "Hello.")
        await pilot.press("f2")
        await pilot.pause(0.5)
        table = app.screen.query_one("#models", DataTable)
        rows = {str(table.get_row_at(i)[0]): table.get_row_at(i) for i in range(table.row_count)}
        assert rows["smollm2-135m"][4] == "yes"  # 135M fits this machine
        app.screen.query_one("#temperature", Input).value = "-1"
        app.screen.query_one("#save-settings", Button).press()
        await pilot.pause()
        assert "temperature must be at least 0" in str(app.screen.query_one("#settings-status", Label).render())
        app.screen.query_one("#temperature", Input).value = "0.3"
        app.screen.query_one("#system", Input).value = "Answer in French."
        app.screen.query_one("#save-settings", Button).press()
        await pilot.pause()
        stored = app.history.load(app.conversation.id).settings
        assert stored["temperature"] == 0.3 and stored["system"] == "Answer in French."
        assert session.sampling.temperature == 0.3 and session.messages[0] == {"role": "system",
                                                                               "content": "Answer in French."}


async def test_a_pull_with_no_network_says_so_in_one_line(fresh_engine: Engine, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: the hub cannot be reached
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    app, _ = new_app(fresh_engine, tmp_path / "h.sqlite")
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("f2")
        await pilot.pause(0.3)
        app.screen.query_one("#repo", Input).value = "someone/some-model-GGUF"
        app.screen.query_one("#pull", Button).press()
        for _ in range(200):
            await pilot.pause(0.1)
            if "pulling" not in str(app.screen.query_one("#pull-status", Label).render()):
                break
        status = str(app.screen.query_one("#pull-status", Label).render())
        assert status.startswith("edgellm: the hub (http://127.0.0.1:9) cannot be reached"), status
        assert "\n" not in status and "Traceback" not in status


def test_the_pipeline_reports_each_stage_and_a_cancel_leaves_nothing(tmp_path: Path, smol_hf: Path):
    folder = tiny_checkpoint(tmp_path / "tiny", "LlamaForCausalLM", smol_hf)
    seen: list[str] = []
    job = QuantizeJob(folder, tmp_path / "out" / "tiny-Q4_0.gguf", "Q4_0", imatrix_chunks=2)
    result = run(job, lambda stage, done, total: seen.append(stage) if not seen or seen[-1] != stage else None)
    assert seen == ["convert", "importance matrix", "quantize", "report"] and set(seen) <= set(STAGES)
    assert result.out.is_file() and result.quality is not None
    cancel = threading.Event()
    job = QuantizeJob(folder, tmp_path / "out" / "tiny-cancelled.gguf", "Q4_0", imatrix_chunks=2)

    def cancel_during_convert(stage: str, done, total) -> None:
        if stage == "convert" and done:
            cancel.set()

    with pytest.raises(Cancelled):
        run(job, cancel_during_convert, cancel)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny-Q4_0.gguf", "tiny-Q4_0.imatrix"]


async def test_quantize_a_tiny_checkpoint_from_the_screen_and_see_it_listed(fresh_engine: Engine, tmp_path: Path,
                                                                            smol_hf: Path, monkeypatch):
    monkeypatch.setenv("EDGELLM_MODELS", str(tmp_path / "models"))
    folder = tiny_checkpoint(tmp_path / "TinyLlama-test", "LlamaForCausalLM", smol_hf)
    app, _ = new_app(fresh_engine, tmp_path / "h.sqlite")
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("f3")
        await pilot.pause(0.3)
        app.screen.query_one("#source", Input).value = str(folder)
        app.screen.query_one("#kind", Input).value = "Q8_0"
        app.screen.query_one("#start", Button).press()
        for _ in range(600):
            await pilot.pause(0.1)
            if app.screen._cancel is None and "done" in str(app.screen.query_one("#stage", Label).render()):
                break
        stage = str(app.screen.query_one("#stage", Label).render())
        assert "done" in stage and "TinyLlama-test-Q8_0.gguf" in stage, stage
        assert (tmp_path / "models" / "TinyLlama-test-Q8_0.gguf").is_file()
        await pilot.press("f2")
        await pilot.pause(0.5)
        table = app.screen.query_one("#models", DataTable)
        names = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert "TinyLlama-test-Q8_0" in names


def test_a_corrupt_database_is_moved_aside_and_a_new_one_made(tmp_path: Path):
    db = tmp_path / "history.sqlite"
    db.write_bytes(b"this is not a database" * 100)
    history = History(db)
    assert history.moved_aside is not None and history.moved_aside.read_bytes().startswith(b"this is not")
    assert history.schema_version == 1 and history.conversations() == []
    history.add(history.create("m"), Message("user", "still works"))
    assert history.conversations()[0].title == "still works"


def test_two_processes_share_the_database_while_one_writes(tmp_path: Path):
    db = tmp_path / "history.sqlite"
    a, b = History(db), History(db)
    assert a.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conversation = a.create("m")
    hold = sqlite3.connect(db, timeout=0, check_same_thread=False)
    hold.execute("BEGIN IMMEDIATE")  # another writer holds the lock for a moment
    threading.Timer(0.3, hold.rollback).start()
    b.add(b.load(conversation.id), Message("user", "waited for the lock"))  # the busy timeout waits
    assert [m.content for m in a.load(conversation.id).messages] == ["waited for the lock"]


async def test_a_new_chat_after_a_corrupt_database_tells_where_the_old_one_went(fresh_engine: Engine,
                                                                               tmp_path: Path):
    db = tmp_path / "history.sqlite"
    db.write_bytes(b"\0garbage" * 64)
    app, _ = new_app(fresh_engine, db)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        welcome = str(app.query_one("#welcome").render())
        assert "moved to" in welcome and ".corrupt-" in welcome
        await type_and_send(app, pilot, "Hi")
        assert "t/s" in status_text(app)


async def test_coming_back_to_a_conversation_restores_its_kv_cache_instead_of_prefilling(fresh_engine: Engine,
                                                                                        tmp_path: Path):
    app, _ = new_app(fresh_engine, tmp_path / "h.sqlite")
    async with app.run_test(size=(120, 30)) as pilot:
        await type_and_send(app, pilot, "Tell me about the sea and its tides, in a few words.")
        first = app.conversation.id
        held = list(fresh_engine.kv_tokens)
        await pilot.press("ctrl+n")
        await pilot.pause(0.3)
        assert fresh_engine.kv_tokens == []  # a new chat starts from an empty cache
        await type_and_send(app, pilot, "Count to three.")
        await app.open_conversation(first)
        assert fresh_engine.kv_tokens == held  # back from disk, position for position
        await app.chat.show_conversation()
        await type_and_send(app, pilot, "And the moon?")
        stats = app.history.load(first).messages[-1].stats
        assert stats["reused_tokens"] >= len(held) - 1 and stats["prefilled_tokens"] < 40


async def test_quitting_mid_reply_keeps_the_reply_so_far(fresh_engine: Engine, tmp_path: Path):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=2000)
    app = ChatApp(session, history=History(tmp_path / "h.sqlite"))
    async with app.run_test(size=(100, 30)) as pilot:
        await start_long_reply(app, pilot, 1.0)
        await pilot.press("ctrl+q")
        await pilot.pause(0.5)
    (conversation,) = History(tmp_path / "h.sqlite").conversations()
    last = History(tmp_path / "h.sqlite").load(conversation.id).messages[-1]
    assert last.role == "assistant" and last.status == "stopped" and len(last.content) > 20


async def test_a_model_that_does_not_load_leaves_the_app_open_with_the_next_step(tmp_path: Path):
    def prepare():
        from edgellm.errors import EdgeLLMError

        raise EdgeLLMError("Qwen-7B needs 5.1 GiB but 2.0 GiB is free")

    app = ChatApp(prepare=prepare, history=History(tmp_path / "h.sqlite"))
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause(0.5)
        assert "could not load the model: Qwen-7B needs 5.1 GiB" in status_text(app)
        assert app.is_running and app.query_one(PromptArea).disabled
        await pilot.press("f2")  # the next step: pick another model
        await pilot.pause(0.3)
        assert app.screen.query_one("#models", DataTable).row_count >= 1


@pytest.fixture
def no_cli_parser(monkeypatch) -> None:
    """The UI plans as `edgellm chat` would from the flags' typed defaults, never from the CLI's parser."""
    def refuse(name: str):
        raise AssertionError(f"the UI built the {name!r} command's argparse parser")

    monkeypatch.setattr("edgellm.cli.command_parser", refuse)


def test_the_flag_defaults_the_ui_plans_with_are_the_cli_s():
    from edgellm.cli import command_parser

    parser, _ = command_parser("chat")
    parsed = vars(parser.parse_args(["model.gguf"]))
    flags = vars(FLAGS.namespace(model="model.gguf"))
    assert flags == {name: parsed[name] for name in flags}


async def test_switch_to_another_model_from_the_models_screen(fresh_engine: Engine, tmp_path: Path, no_cli_parser):
    gemma = dev_model("gemma3-270m")
    app, _ = new_app(fresh_engine, tmp_path / "h.sqlite")
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("f2")
        await pilot.pause(0.5)
        table = app.screen.query_one("#models", DataTable)
        row = next(i for i in range(table.row_count) if table.get_row_at(i)[0] == "gemma3-270m")
        table.move_cursor(row=row)
        await pilot.press("enter")
        await app.loading.wait()
        assert app.session.engine.path == gemma and app.screen is app.chat, status_text(app)
        assert not app.query_one(PromptArea).disabled
        await type_and_send(app, pilot, "The capital of France is")
        # a base model: its reply may end at a ChatML marker it writes as text, but it was Gemma's
        assert app.history.load(app.conversation.id).messages[-1].stats["generated_tokens"] > 0
        assert re.search(r"\d+ tokens · [\d.]+ t/s", status_text(app)), status_text(app)
        assert app.history.conversations()[0].model == app.session.engine.info.name


def use_hub(monkeypatch, url: str, tmp_path: Path) -> None:
    """Point the `edgellm pull` the screen starts, and this process, at a local hub and a fresh cache."""
    from huggingface_hub import constants

    for key, value in {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
                       "HF_HUB_OFFLINE": "0"}.items():
        monkeypatch.setenv(key, value)
    # this process's huggingface-hub read them at import
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))


async def press_pull(app: ChatApp, pilot, repo: str) -> None:
    await pilot.press("f2")
    await pilot.pause(0.3)
    app.screen.query_one("#repo", Input).value = repo
    app.screen.query_one("#pull", Button).press()


async def test_pull_from_the_models_screen_shows_progress_and_lists_the_model(fresh_engine: Engine, smollm2: Path,
                                                                            tmp_path: Path, monkeypatch):
    from hub_server import Hub

    repo, name = "test-org/Tiny-GGUF", "tiny-q4_1.gguf"
    with Hub({repo: {name: smollm2}}) as hub:
        use_hub(monkeypatch, hub.url, tmp_path)
        app, _ = new_app(fresh_engine, tmp_path / "h.sqlite")
        async with app.run_test(size=(120, 30)) as pilot:
            await press_pull(app, pilot, repo)
            for _ in range(300):
                await pilot.pause(0.1)
                if "pulled" in str(app.screen.query_one("#pull-status", Label).render()):
                    break
            assert "pulled" in str(app.screen.query_one("#pull-status", Label).render())
            from edgellm.tui.screens.models import download_size

            assert download_size(repo) == smollm2.stat().st_size  # the bar's total, from the hub's listing
            table = app.screen.query_one("#models", DataTable)
            assert f"{repo}:{name}" in [str(table.get_row_at(i)[0]) for i in range(table.row_count)]


async def test_ctrl_c_stops_a_reply_and_keeps_it_then_a_too_small_terminal_is_told(fresh_engine: Engine,
                                                                                   tmp_path: Path):
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=2000)
    app = ChatApp(session, history=History(tmp_path / "h.sqlite"))
    async with app.run_test(size=(100, 30)) as pilot:
        await start_long_reply(app, pilot)
        await pilot.press("ctrl+c")  # stops the reply; the app stays
        await wait_for_reply(app, pilot)
        assert app.is_running and "stopped" in status_text(app)
        last = app.history.load(app.conversation.id).messages[-1]
        assert (last.role, last.status) == ("assistant", "stopped") and last.content
        await pilot.resize_terminal(50, 12)
        await pilot.pause(0.3)
        assert any("the chat needs 60×16" in str(n.message) for n in app._notifications)


async def test_a_pull_can_be_cancelled_from_the_models_screen(fresh_engine: Engine, smollm2: Path, tmp_path: Path,
                                                             monkeypatch):
    from hub_server import Hub

    repo, name = "test-org/Slow-GGUF", "slow-q4_1.gguf"
    with Hub({repo: {name: smollm2}}, block_delay_s=0.2) as hub:  # ~5 MiB/s: 20 s for the whole file
        use_hub(monkeypatch, hub.url, tmp_path)
        app, _ = new_app(fresh_engine, tmp_path / "h.sqlite")
        async with app.run_test(size=(120, 30)) as pilot:
            await press_pull(app, pilot, repo)
            for _ in range(100):
                await pilot.pause(0.1)
                if any("GET" in r and name in r for r in hub.requests):
                    break
            await pilot.pause(0.5)
            app.screen.query_one("#cancel-pull", Button).press()
            for _ in range(100):
                await pilot.pause(0.1)
                if app.screen._pull is None:
                    break
            status = str(app.screen.query_one("#pull-status", Label).render())
            assert status.startswith("pull cancelled"), status
    snapshots = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"
    assert not list(snapshots.rglob(name))  # nothing that looks downloaded


# -- threads: the model manager, the llama thread and the UI ---------------------------------------------

def on_llama(fn, *args, **kwargs):
    return llama_thread().submit(functools.partial(fn, *args, **kwargs)).result(120)


def chat_plan(path: Path):
    return on_llama(planned_chat, path, "edit")  # the plan's dry run is a llama.cpp call


def chat_charge(path: Path) -> int:
    plan = chat_plan(path).plan
    return plan.peak_bytes - plan.base_bytes


def chat_prepare(path: Path):
    """What `edgellm chat PATH --draft edit` does before loading."""
    from edgellm.commands.chat import prepare

    return functools.partial(prepare, FLAGS.namespace(model=str(path), draft="edit"), path)


def managed_app(path: Path, tmp_path: Path, manager: ModelManager) -> ChatApp:
    return ChatApp(prepare=chat_prepare(path), history=History(tmp_path / "h.sqlite"), manager=manager,
                   settings=ChatSettings(max_tokens=8))


async def test_switching_models_gives_the_old_one_back_first_when_both_do_not_fit(smollm2: Path, tmp_path: Path,
                                                                                 no_cli_parser):
    gemma = dev_model("gemma3-270m")
    # room for either model, not both; a wait for memory ends in 5 s (it used to wait for ever)
    manager = ModelManager(budget=max(chat_charge(smollm2), chat_charge(gemma)) + (16 << 20), wait_s=5.0)
    app = managed_app(smollm2, tmp_path, manager)
    try:
        async with app.run_test(size=(120, 30)) as pilot:
            await app.loading.wait()
            assert app.session.engine.path.name == smollm2.name, status_text(app)
            await type_and_send(app, pilot, "Hi")
            await app.switch_model(gemma).wait()
            assert app.session is not None and app.session.engine.info.arch == "gemma3", status_text(app)
            assert [p.name for p in manager.loaded()] == [gemma.name]
            assert any(ev.startswith("evicted " + smollm2.name) for ev in manager.events)
            assert not app.query_one(PromptArea).disabled
            await type_and_send(app, pilot, "The capital of France is")
            assert app.history.load(app.conversation.id).messages[-1].stats["generated_tokens"] > 0
    finally:
        on_llama(manager.close)


async def test_the_model_switched_from_leaves_on_the_llama_thread_when_its_keep_alive_runs_out(smollm2: Path,
                                                                                             tmp_path: Path):
    gemma = dev_model("gemma3-270m")
    loads = WatchedEngines()
    manager = ModelManager(budget=4 * (chat_charge(smollm2) + chat_charge(gemma)), keep_alive_s=0.0, load=loads)
    app = managed_app(smollm2, tmp_path, manager)
    try:
        async with app.run_test(size=(120, 30)):
            await app.loading.wait()
            await app.switch_model(gemma).wait()
            assert app.session.engine.info.arch == "gemma3", status_text(app)
            # both fit: nothing evicts the old one, its keep-alive (0 s here) ends it
            gone = await asyncio.get_running_loop().run_in_executor(
                None, manager.wait_for, lambda: [p.name for p in manager.loaded()] == [gemma.name], 60)
            assert gone and loads.closed_on == ["llama_0"]
            assert any(ev.startswith("unloaded after keep-alive " + smollm2.name) for ev in manager.events)
    finally:
        on_llama(manager.close)


async def test_a_load_that_waits_too_long_for_memory_says_so_and_the_app_stays(smollm2: Path, tmp_path: Path):
    gemma = dev_model("gemma3-270m")
    manager = ModelManager(budget=max(chat_charge(smollm2), chat_charge(gemma)) + (16 << 20), wait_s=0.5)
    planned = chat_plan(smollm2)
    held = on_llama(manager.acquire, planned.path, planned.request, plan=planned.plan, **planned.extra)  # another user
    app = managed_app(gemma, tmp_path, manager)
    try:
        async with app.run_test(size=(120, 30)) as pilot:
            await app.loading.wait()
            await pilot.pause()
            line = status_text(app)
            assert line.startswith(f"could not load the model: {gemma.name} needs") and "(0.5 s)" in line, line
            assert app.is_running and app.session is None and app.query_one(PromptArea).disabled
            assert any("F2 lists the models" in str(n.message) for n in app._notifications)
    finally:
        on_llama(manager.release, held)
        on_llama(manager.close)


async def start_reply_with(app: ChatApp, pilot, speculator) -> None:
    """A long reply, decoding with `speculator` on the llama thread when this returns."""
    app.query_one(PromptArea).text = "Write a very long story about a lighthouse by the sea."
    app.query_one(PromptArea).focus()
    await pilot.press("enter")
    assert await asyncio.get_running_loop().run_in_executor(None, speculator.started.wait, 60)


async def test_a_new_draft_closes_the_old_speculator_on_the_llama_thread_after_the_reply_using_it(
        fresh_engine: Engine, tmp_path: Path, no_cli_parser):
    watched = watched_speculator(fresh_engine)
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=2000, speculator=watched)
    app = ChatApp(session, history=History(tmp_path / "h.sqlite"))
    async with app.run_test(size=(100, 30)) as pilot:
        await start_reply_with(app, pilot, watched)
        change = app.change_draft("off")  # its plan and speculator wait for the llama thread: the reply has it
        await pilot.press("escape")
        await wait_for_reply(app, pilot)
        await change.wait()
        assert watched.closes == [("llama_0", 0)]  # on the llama thread, with no reply decoding with it
        assert session.speculator is None  # "off": no speculator from now on
        assert app.history.load(app.conversation.id).messages[-1].status == "stopped"


async def test_closing_the_app_mid_reply_closes_the_speculator_on_the_llama_thread_after_the_reply(
        fresh_engine: Engine, tmp_path: Path):
    watched = watched_speculator(fresh_engine)
    session = ChatSession(fresh_engine, SamplingParams.greedy_params(), max_tokens=2000, speculator=watched)
    app = ChatApp(session, history=History(tmp_path / "h.sqlite"))
    async with app.run_test(size=(100, 30)) as pilot:
        await start_reply_with(app, pilot, watched)
    # the app closed with the reply decoding: the reply stopped and was saved, then the speculator closed
    assert watched.closes == [("llama_0", 0)]
    history = History(tmp_path / "h.sqlite")
    (conversation,) = history.conversations()
    last = history.load(conversation.id).messages[-1]
    assert (last.role, last.status) == ("assistant", "stopped")  # as far as it was shown (maybe no frame yet)
