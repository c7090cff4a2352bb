"""llama.cpp's RPC backend: `edgellm worker` processes on loopback, and models split across them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from edgellm.runtime.rpc import Endpoint, RpcError, check, parse_endpoints
from tests.support.server import WorkerProcess, free_port
from tests.test_cli import assert_one_line_error

PROMPT = ("run", "smollm2-135m", "Name three colors.", "--temp", "0", "-n", "32", "--json")


@pytest.fixture
def worker(tmp_path):
    with WorkerProcess("--cache", str(tmp_path / "rpc-cache")) as w:
        yield w


def text_of(result) -> str:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["text"]


def test_worker_says_where_it_is_and_what_it_offers_then_stops_cleanly(tmp_path):
    with WorkerProcess("--cache", str(tmp_path / "rpc-cache")) as w:
        assert f"use it with --rpc {w.endpoint}" in w.wait_for("edgellm: worker on", 5)
        assert "MiB free of" in w.wait_for("edgellm: worker device CPU", 5)
        (device,) = check(Endpoint("127.0.0.1", w.port))  # the handshake and memory, in llama.cpp's protocol
        assert 0 < device.free <= device.total
        assert w.stop(signal.SIGTERM) == 0
    assert "edgellm: worker stopped" in "".join(w.output)


def test_worker_binds_loopback_unless_allowed(cli):
    result = cli("worker", "--host", "0.0.0.0", "--port", str(free_port()))
    assert_one_line_error(result, "--allow-remote")


@pytest.mark.parametrize("text, why", [("localhost", "HOST:PORT"), ("a:0", "HOST:PORT"), ("a:99999", "HOST:PORT"),
                                       ("a:1,a:1", "named twice"), (":80", "HOST:PORT")])
def test_bad_endpoints_are_refused_before_connecting(text: str, why: str):
    with pytest.raises(RpcError, match=why):
        parse_endpoints(text)


def test_a_socket_that_is_not_a_worker_is_refused_without_a_hang():
    """A listener that never answers the handshake (what a busy worker looks like) times out in one line."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
        with pytest.raises(RpcError, match="did not answer"):
            check(Endpoint("127.0.0.1", port), timeout=1.0)
        for conn in accepted:
            conn.close()


def test_greedy_text_split_across_a_worker_equals_the_local_run(cli, worker):
    local = text_of(cli(*PROMPT))
    split = cli(*PROMPT, "--rpc", worker.endpoint, "-ngl", "12")
    assert text_of(split) == local
    assert "Accepted" not in split.stderr  # llama.cpp's RPC lines stay out of the user's terminal


def test_two_workers_share_the_layers(cli, tmp_path):
    with WorkerProcess("--cache", "off") as a, WorkerProcess("--cache", "off") as b:
        endpoints = f"{a.endpoint},{b.endpoint}"
        plan = cli("plan", "smollm2-135m", "--rpc", endpoints, "-ngl", "20")
        assert plan.returncode == 0, plan.stderr
        assert f"20 of 31 layers on the workers {a.endpoint}, {b.endpoint}" in plan.stdout
        shares = json.loads(cli("plan", "smollm2-135m", "--rpc", endpoints, "-ngl", "20", "--json").stdout)["workers"]
        assert [w["endpoint"] for w in shares] == [a.endpoint, b.endpoint]
        assert sum(w["layers"] for w in shares) == 20 and all(w["layers"] > 0 for w in shares)
        assert text_of(cli(*PROMPT, "--rpc", endpoints, "-ngl", "20")) == text_of(cli(*PROMPT))


def test_a_model_over_the_local_budget_runs_across_a_worker_and_is_refused_without_it(cli, worker):
    budget = ("--ram", "190M")  # SmolLM2 at 4096 tokens plans ~230 MiB here
    alone = cli("plan", "smollm2-135m", *budget)
    assert_one_line_error(alone, "does not fit")
    plan = json.loads(cli("plan", "smollm2-135m", *budget, "--rpc", worker.endpoint, "--json").stdout)
    assert plan["fits"] and 0 < plan["n_gpu_layers"] < 31  # local first: only what does not fit goes there
    assert text_of(cli(*PROMPT, *budget, "--rpc", worker.endpoint)) == text_of(cli(*PROMPT))
    port = worker.port
    worker.stop()
    gone = cli(*PROMPT, *budget, "--rpc", f"127.0.0.1:{port}")
    assert_one_line_error(gone, f"worker 127.0.0.1:{port} is unreachable")


def test_a_worker_offers_only_its_mem_and_clients_plan_with_it(cli):
    with WorkerProcess("--cache", "off", "--mem", "1M") as w:
        assert "worker device CPU: 1 MiB free of 1 MiB" in "".join(w.output)
        (device,) = check(parse_endpoints(w.endpoint)[0])  # what the protocol tells every client
        assert device.free == device.total == 1 << 20
        refused = cli("plan", "smollm2-135m", "--ram", "190M", "--rpc", w.endpoint)
        assert_one_line_error(refused, "does not fit", "of 1 MiB free on the workers")
    assert_one_line_error(cli("worker", "--mem", "0"), "--mem must be at least 1M")
    assert_one_line_error(cli("worker", "--mem", "1.2.3"), "cannot read '1.2.3' as a size")


def test_an_unreachable_worker_is_named_in_one_line(cli):
    port = free_port()
    assert_one_line_error(cli(*PROMPT, "--rpc", f"127.0.0.1:{port}", "-ngl", "4"), f"127.0.0.1:{port}", "unreachable")
    assert_one_line_error(cli(*PROMPT, "-ngl", "4", env={"EDGELLM_RPC": f"127.0.0.1:{port}"}), "unreachable")


LONG = ("run", "smollm2-135m", "Write a long story about a lighthouse keeper and the sea.", "--temp", "0", "-n", "160")


def run_losing_worker(args: tuple[str, ...], lose=lambda w: w.stop(signal.SIGKILL),
                      env: dict[str, str] | None = None) -> tuple[int, str, str, str]:
    """`edgellm ARGS --rpc W`, and `lose(W)` once the reply has begun on W: (exit code, the whole stdout,
    stderr, W's endpoint)."""
    with WorkerProcess("--cache", "off") as w:
        run = subprocess.Popen([sys.executable, "-m", "edgellm.cli", *args, "--rpc", w.endpoint],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               env={**os.environ, **(env or {})})
        assert run.stdout is not None
        try:
            first = run.stdout.read1(4096)  # the reply has begun on the worker
            assert first
            lose(w)
            rest, err = run.communicate(timeout=300)
        finally:
            w.stop(signal.SIGKILL)
    return run.returncode, (first + rest).decode(), err.decode(), w.endpoint


def one_note(err: str, endpoint: str) -> str:
    notes = [line for line in err.splitlines() if "went away" in line]
    assert len(notes) == 1, err
    assert f"worker {endpoint} went away after" in notes[0] and "here alone" in notes[0]
    assert "Traceback" not in err
    return notes[0]


def test_a_worker_killed_mid_reply_costs_a_pause_not_the_reply(cli):
    local = cli(*LONG)
    assert local.returncode == 0, local.stderr
    code, text, err, endpoint = run_losing_worker((*LONG, "-ngl", "20"))
    assert code == 0, err
    assert text == local.stdout  # the same greedy text, whole
    one_note(err, endpoint)


def test_a_structured_reply_keeps_its_grammar_across_a_lost_worker(cli):
    """The new child takes the reply's tokens so far as its own: the grammar and the penalty window go on
    from them (as prompt they would restart the JSON at its first brace)."""
    ask = ("run", "smollm2-135m", "List twenty fruits and their colours.", "--format", "json", "--temp", "0",
           "-n", "120")
    local = cli(*ask)
    assert local.returncode == 0, local.stderr
    code, text, err, endpoint = run_losing_worker((*ask, "-ngl", "20"))
    assert code == 0, err
    one_note(err, endpoint)
    assert text == local.stdout


def test_a_worker_that_stops_answering_is_left_behind_after_the_stall_limit(cli):
    """A worker that vanishes without closing its connection (SIGSTOP here; power or network in life):
    llama.cpp waits on it for ever, so the child that sends nothing for EDGELLM_RPC_STALL_S is ended, the
    worker found not answering, and the reply goes on here."""
    local = cli(*LONG)
    assert local.returncode == 0, local.stderr
    code, text, err, endpoint = run_losing_worker((*LONG, "-ngl", "20"), lose=lambda w: w.proc.send_signal(
        signal.SIGSTOP), env={"EDGELLM_RPC_STALL_S": "3"})
    assert code == 0, err
    assert text == local.stdout
    one_note(err, endpoint)


def test_a_bad_stall_limit_is_refused_in_one_line(cli, worker):
    for value, why in (("soon", "must be a number of seconds"), ("0", "must be above 0")):
        result = cli(*PROMPT, "--rpc", worker.endpoint, "-ngl", "20", env={"EDGELLM_RPC_STALL_S": value})
        assert_one_line_error(result, "EDGELLM_RPC_STALL_S", why)


def test_when_the_rest_no_longer_fits_the_reply_ends_in_one_line_and_keeps_its_text(cli):
    local = cli(*LONG)
    code, kept, err, endpoint = run_losing_worker((*LONG, "--ram", "190M"))
    assert code == 1
    assert kept.strip() and local.stdout.startswith(kept.rstrip("\n"))  # the text so far, as the local run has it
    (line,) = err.strip().splitlines()
    assert f"worker {endpoint} went away" in line and "does not fit" in line


def test_serve_answers_with_layers_on_a_worker(worker, tmp_path):
    import openai

    from tests.support.server import ServerProcess

    def ask(server: ServerProcess) -> str:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="smollm2-135m", max_tokens=32, temperature=0,
                                               messages=[{"role": "user", "content": "Name three colors."}])
        return reply.choices[0].message.content

    common = ("--model", "smollm2-135m", "--parallel", "1", "--ctx", "1024", "--draft", "off")
    with ServerProcess(*common, env={"TMPDIR": str(tmp_path)}) as alone:
        local = ask(alone)
    with ServerProcess(*common, "--rpc", worker.endpoint, "-ngl", "12", env={"TMPDIR": str(tmp_path)}) as split:
        assert ask(split) == local
        assert ask(split) == local  # a second request on the same connection to the worker


def test_serve_refuses_an_unreachable_worker_before_opening_its_port(cli):
    port = free_port()
    assert_one_line_error(cli("serve", "--rpc", f"127.0.0.1:{port}", "--port", str(free_port())), "unreachable")


def test_a_served_stream_survives_its_worker_and_the_next_request_plans_without_it(tmp_path):
    import openai

    from tests.support.server import ServerProcess

    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]

    def stream(server: ServerProcess, on_first=None) -> tuple[str, list[str]]:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
        text, notes = [], []
        for chunk in client.chat.completions.create(model="smollm2-135m", max_tokens=160, temperature=0,
                                                    messages=story, stream=True):
            note = (chunk.model_extra or {}).get("x_edgellm", {}).get("event")
            if note:
                notes.append(note)
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
                if on_first is not None and len(text) == 1:
                    on_first()
        return "".join(text), notes

    common = ("--model", "smollm2-135m", "--parallel", "1", "--ctx", "1024", "--draft", "off")
    with ServerProcess(*common, env={"TMPDIR": str(tmp_path)}) as alone:
        local, _ = stream(alone)
    assert len(local) > 200
    with WorkerProcess("--cache", "off") as w, \
            ServerProcess(*common, "--rpc", w.endpoint, "-ngl", "20", env={"TMPDIR": str(tmp_path)}) as split:
        text, notes = stream(split, on_first=lambda: w.stop(signal.SIGKILL))
        assert text == local  # the same greedy reply, whole
        assert len(notes) == 1 and f"worker {w.endpoint} went away" in notes[0] and "here alone" in notes[0]
        assert stream(split) == (local, [])  # the next request runs here, without asking the lost worker
        log = "".join(split.output)
        assert log.count("went away") == 1 and "Traceback" not in log


def test_a_chat_goes_on_when_its_worker_goes_away(cli):
    chat = ("chat", "--plain", "smollm2-135m", "--temp", "0", "-n", "160", "--draft", "off")
    first, second = "Write a long story about a lighthouse keeper and the sea.", "Now give it a title."
    local = cli(*chat, input=f"{first}\n{second}\n")
    assert local.returncode == 0, local.stderr
    with WorkerProcess("--cache", "off") as w:
        run = subprocess.Popen([sys.executable, "-m", "edgellm.cli", *chat, "--rpc", w.endpoint, "-ngl", "20"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert run.stdin is not None and run.stdout is not None
        run.stdin.write(f"{first}\n".encode())
        run.stdin.flush()
        begun = run.stdout.read1(4096)  # the first reply has begun on the worker
        assert begun
        w.stop(signal.SIGKILL)
        rest, err = run.communicate(f"{second}\n".encode(), timeout=300)
    assert run.returncode == 0, err.decode()
    assert (begun + rest).decode() == local.stdout  # both replies, as the local chat gave them
    notes = [line for line in err.decode().splitlines() if "went away" in line]
    assert len(notes) == 1 and f"worker {w.endpoint} went away" in notes[0] and "here alone" in notes[0]
    assert "Traceback" not in err.decode()


async def test_the_chat_app_goes_on_when_its_worker_goes_away(engine, tmp_path):
    """The Textual chat over a split model (its child holds it): the worker killed mid-reply, the bubble
    ends with the whole greedy reply and the status line keeps the note."""
    from edgellm.options import FLAGS, planned_load
    from edgellm.runtime.backend import llama_thread
    from edgellm.runtime.sampling import SamplingParams
    from edgellm.session import ChatSession
    from edgellm.tui.app import ChatApp
    from edgellm.tui.history import History
    from edgellm.tui.widgets import Bubble, PromptArea, StatusBar

    story = "Write a long story about a lighthouse keeper and the sea."
    greedy = SamplingParams.greedy_params()
    engine.reset()
    local = "".join(r.text for r in engine.chat([{"role": "user", "content": story}], sampling=greedy,
                                                max_tokens=160))
    with WorkerProcess("--cache", "off") as w:
        flags = FLAGS.namespace(model=str(engine.info.path), rpc=w.endpoint, gpu_layers=20, ctx=1024, draft="off")
        planned = planned_load(flags, engine.info)
        split = await asyncio.wrap_future(llama_thread().submit(planned.load_split))
        session = ChatSession(split, greedy, max_tokens=160)
        app = ChatApp(session, history=History(tmp_path / "history.sqlite"))
        async with app.run_test(size=(100, 40)) as pilot:
            app.query_one(PromptArea).text = story
            app.query_one(PromptArea).focus()
            await pilot.press("enter")
            deadline = asyncio.get_running_loop().time() + 60
            while not list(app.query(Bubble))[-1].plain.strip():  # the reply has begun on the worker
                assert asyncio.get_running_loop().time() < deadline, "no reply began"
                await pilot.pause(0.05)
            w.stop(signal.SIGKILL)
            await app.chat.reply_done(timeout=120)
            await pilot.pause()
            assert session.messages[-1] == {"role": "assistant", "content": local}  # the whole greedy reply
            assert list(app.query(Bubble))[-1].plain == local
            assert f"worker {w.endpoint} went away" in app.query_one(StatusBar).line
        await asyncio.wrap_future(llama_thread().submit(split.close))


async def test_the_chat_app_keeps_rpc_for_the_next_model_it_loads(engine, tmp_path):
    """`edgellm chat --rpc W`: a model picked later in the app is planned with W too (here W is down, so
    the switch is refused in the status line naming it, and the app stays)."""
    from edgellm.runtime.sampling import SamplingParams
    from edgellm.session import ChatSession
    from edgellm.tui.app import ChatApp
    from edgellm.tui.history import History
    from edgellm.tui.widgets import StatusBar

    down = f"127.0.0.1:{free_port()}"
    engine.reset()
    app = ChatApp(ChatSession(engine, SamplingParams.greedy_params(), max_tokens=8),
                  history=History(tmp_path / "history.sqlite"), workers={"rpc": down, "ram": None})
    async with app.run_test(size=(100, 40)):
        await app.switch_model(engine.info.path).wait()
        line = app.query_one(StatusBar).line
        assert "could not load the model" in line and f"worker {down} is unreachable" in line
