"""kill -9 in the middle of the work that writes files, with real processes: nothing half-written is
ever taken for whole, and the next run cleans up after the killed one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.runtime import kvfile
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.tui.history import History
from tests.support.terminal import Terminal
from tests.test_quantize import tiny_checkpoint


def wait_until(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_quantize_killed_leaves_nothing_under_the_output_name_and_the_next_run_cleans_up(tmp_path: Path,
                                                                                       smol_hf: Path):
    folder = tiny_checkpoint(tmp_path / "Tiny", "LlamaForCausalLM", smol_hf)
    out = tmp_path / "out" / "Tiny-Q4_0.gguf"
    args = [sys.executable, "-m", "edgellm.cli", "quantize", str(folder), "--type", "Q4_0", "-o", str(out),
            "--imatrix-chunks", "8"]
    env = {**os.environ, "EDGELLM_DATA": str(tmp_path / "data")}
    killed = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    intermediate = out.with_name(f".{out.stem}.f16.gguf")
    wait_until(lambda: intermediate.exists() or killed.poll() is not None, what="the F16 intermediate")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not out.exists()  # nothing under the output name, whatever step it was in
    left = sorted(p.name for p in out.parent.iterdir())
    assert left and all(name.startswith(".") for name in left), left  # only temporaries were left

    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["Tiny-Q4_0.gguf", "Tiny-Q4_0.imatrix"]


def test_chat_killed_mid_reply_keeps_every_completed_message(tmp_path: Path, no_local_models: dict[str, str]):
    data = tmp_path / "data"
    term = Terminal([sys.executable, "-m", "edgellm.cli", "chat", "--temp", "0", "-n", "2000"],
                    {**no_local_models, "EDGELLM_DATA": str(data)}, f"edgellm-crash-{os.getpid()}")
    try:
        term.wait_for(lambda s: "ready" in s)
        term.type("Say hello.")
        term.key("Enter")
        term.wait_for(lambda s: "t/s" in s)
        term.type("Write a very long story about the sea.")
        term.key("Enter")
        term.wait_for(lambda s: "thinking" in s)  # the status line says so until the reply ends
        time.sleep(0.5)
        assert "thinking" in term.text()  # still mid-reply
        os.kill(term.process_id(), signal.SIGKILL)
        time.sleep(0.5)
    finally:
        term.close()
    history = History(data / "history.sqlite")  # opens cleanly: WAL recovery, no corruption
    assert history.moved_aside is None
    assert history.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    (conversation,) = history.conversations()
    messages = history.load(conversation.id).messages
    assert [m.role for m in messages[:3]] == ["user", "assistant", "user"]
    assert messages[2].content == "Write a very long story about the sea."
    assert messages[1].status == "complete" and messages[1].content.strip()


def test_a_half_written_kv_file_is_never_loaded(tmp_path: Path, smollm2: Path):
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_threads=2)) as engine:
        tokens = engine.tokenize("The sea is calm tonight, and the light goes round.")
        list(engine.generate(tokens, max_tokens=1))
        path = tmp_path / "chat.kv"
        held = list(engine.kv_tokens)
        kvfile.save(engine, 0, held, path)
        whole = path.read_bytes()
        path.write_bytes(whole[:len(whole) // 2])  # a copy cut short (the note says it is whole)
        engine.reset()
        with pytest.raises(EdgeLLMError, match="cut short"):  # refused before llama.cpp (it aborts on one)
            kvfile.load(engine, 0, path, engine.n_ctx)
        assert engine.kv_tokens == []
        # killed while saving: only a .partial exists, and nothing takes it for a saved sequence
        path.unlink()
        path.with_name(path.name + ".partial").write_bytes(whole)
        with pytest.raises(EdgeLLMError, match="does not exist"):
            kvfile.load(engine, 0, path, engine.n_ctx)
        path.write_bytes(whole)  # whole again: it loads and continues exactly where it was
        assert kvfile.load(engine, 0, path, engine.n_ctx) == held


def test_a_pull_killed_mid_download_leaves_nothing_that_looks_downloaded_and_the_next_completes(
        tmp_path: Path, smollm2: Path):
    """huggingface-hub 2.x does not resume another process's download (a per-process temporary file, by
    design since its PR #4228): the next pull starts over, and removes the killed one's leftover."""
    from hub_server import Hub

    repo, name = "test-org/Slow-GGUF", "slow-q4_1.gguf"
    with Hub({repo: {name: smollm2}}, block_delay_s=0.05) as hub:  # ~20 MiB/s
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": "0", "EDGELLM_DATA": str(tmp_path / "data")}
        args = [sys.executable, "-m", "edgellm.cli", "pull", repo, "--file", name]
        killed = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        blobs = tmp_path / "hf" / "hub" / f"models--{repo.replace('/', '--')}" / "blobs"
        partial = lambda: [p for p in blobs.glob("*.incomplete") if p.stat().st_size > 16 << 20]  # noqa: E731
        wait_until(lambda: blobs.is_dir() and bool(partial()), what="16 MiB of the download")
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        (leftover,) = partial()
        assert not list((blobs.parent / "snapshots").rglob(name))  # nothing looks downloaded
        stale = time.time() - 120
        os.utime(leftover, (stale, stale))  # two minutes later
        hub.block_delay_s = 0.0
        again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr
        path = Path(again.stdout.strip().rsplit(" -> ", 1)[1])
        assert path.read_bytes() == smollm2.read_bytes()
        assert not leftover.exists() and not list(blobs.glob("*.incomplete"))
