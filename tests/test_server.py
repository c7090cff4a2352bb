"""`edgellm serve`: a real server process on a loopback port, driven by the official openai and ollama clients."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams
from tests.support.near_tie import assert_same_or_near_tie
from tests.support.server import ServerProcess, swap_leftovers

MODEL = "smollm2-135m"
GREEDY = {"temperature": 0, "extra_body": {"repeat_penalty": 1.0}}  # plain greedy: comparable with the engine's


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("serve-tmp")
    with ServerProcess("--model", MODEL, "--parallel", "4", "--ctx", "1024", env={"TMPDIR": str(tmp)}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, text: str, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                          **{**GREEDY, **kwargs})


def streamed(client: openai.OpenAI, text: str, **kwargs) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}],
                                                 stream=True, **{**GREEDY, **kwargs}))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def busy_slots(server: ServerProcess) -> int:
    return sum(m["busy"] for m in httpx.get(f"{server.url}/health").json()["models"])


def wait_until_idle(server: ServerProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while busy_slots(server):  # polls the server's own state; each poll is a round trip, not a guess
        assert time.monotonic() < deadline, "the server kept a slot busy"


# -- OpenAI ---------------------------------------------------------------------------------------------------

def test_models_list_names_the_local_models(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids


def test_chat_plain_and_streamed_give_the_same_text_and_usage_is_the_tokenizers(client, engine: Engine):
    question = "Name three colors."
    reply = ask(client, question, max_tokens=24)
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    prompt = engine.chat_tokens([{"role": "user", "content": question}])
    assert reply.usage.prompt_tokens == len(prompt)
    engine.reset()
    local = [r.token for r in engine.generate(prompt, SamplingParams.greedy_params(), max_tokens=24)
             if r.token is not None]
    if engine.detokenize(local) == text:
        assert reply.usage.completion_tokens == len(local)
    else:  # a batch of one row may differ from a single decode in a logit's last bits
        assert_same_or_near_tie(engine, prompt, local, reply_tokens(engine, prompt, text))
    same, chunks = streamed(client, question, max_tokens=24, stream_options={"include_usage": True})
    assert same == text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == reply.choices[0].finish_reason


def test_completions_stop_strings_and_max_tokens(client):
    full = client.completions.create(model=MODEL, prompt="The days of the week are Monday,", max_tokens=24, **GREEDY)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    stop = text.split(",")[1].strip()[:3]  # a piece of the second day's name
    assert stop
    cut = client.completions.create(model=MODEL, prompt="The days of the week are Monday,", max_tokens=24,
                                    stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text) and len(cut.choices[0].text) < len(text)
    short = ask(client, "Write a long story about the sea.", max_tokens=5)
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"
    brief = ask(client, "Say yes.", max_tokens=64)
    assert brief.choices[0].finish_reason == "stop" and brief.usage.completion_tokens < 64  # it ends by itself
    past = ask(client, "Say yes.", max_tokens=64, extra_body={**GREEDY["extra_body"], "ignore_eos": True})
    assert past.choices[0].finish_reason == "length" and past.usage.completion_tokens == 64  # llama-server's ignore_eos


def test_the_same_seed_gives_the_same_text(client):
    hot = {"temperature": 1.0, "max_tokens": 32, "extra_body": {"repeat_penalty": 1.0}}
    a = ask(client, "Invent a name for a cat.", seed=42, **hot).choices[0].message.content
    b = ask(client, "Invent a name for a cat.", seed=42, **hot).choices[0].message.content
    others = {ask(client, "Invent a name for a cat.", seed=s, **hot).choices[0].message.content for s in (1, 2, 3)}
    assert a == b and len(others | {a}) > 1


# -- Ollama ---------------------------------------------------------------------------------------------------

def test_ollama_client_chat_generate_list_ps_show(server: ServerProcess):
    c = ollama.Client(host=server.url)
    reply = c.chat(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], options={"temperature": 0,
                                                                                            "num_predict": 16})
    assert reply.message.content and reply.done and reply.eval_count <= 16 and reply.prompt_eval_count > 0
    parts = list(c.chat(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], stream=True,
                        options={"temperature": 0, "num_predict": 16}))
    assert "".join(p.message.content for p in parts) == reply.message.content and parts[-1].done
    gen = c.generate(model=MODEL, prompt="The capital of France is", raw=True, options={"temperature": 0,
                                                                                      "num_predict": 8, "seed": 1})
    assert gen.response and gen.done_reason in ("stop", "length")
    pieces = list(c.generate(model=MODEL, prompt="The capital of France is", raw=True, stream=True,
                             options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.response for p in pieces) == gen.response
    assert MODEL in [m.model for m in c.list().models]
    (loaded,) = [m for m in c.ps().models if m.model == MODEL]
    assert loaded.size > 50 << 20 and loaded.expires_at is not None and loaded.context_length == 1024
    shown = c.show(MODEL)
    assert shown.details.family == "llama" and shown.template and "temperature" in shown.parameters
    assert c.show(MODEL).modelinfo["llama.context_length"] > 0


# -- concurrency ----------------------------------------------------------------------------------------------

def test_four_streaming_clients_write_what_each_writes_alone(client, server, engine: Engine):
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "Count from one to ten.",
                 "Name a fruit that is red."]
    alone = [streamed(client, q, max_tokens=32)[0] for q in questions]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = streamed(client, questions[i], max_tokens=32)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for q, want, got in zip(questions, alone, [results[i] for i in range(4)], strict=True):
        prompt = engine.chat_tokens([{"role": "user", "content": q}])
        assert_same_or_near_tie(engine, prompt, reply_tokens(engine, prompt, want), reply_tokens(engine, prompt, got))


def reply_tokens(engine: Engine, prompt: list[int], text: str) -> list[int]:
    """The greedy token path that writes `text` after `prompt`: each token is the one whose piece continues it
    (the best such candidate of the engine's logits, where several do)."""
    import numpy as np

    engine.reset()
    tokens: list[int] = []
    written = ""
    while len(written) < len(text):
        engine.prefill(prompt + tokens)
        order = np.argsort(engine.logits(-1))[::-1][:50]
        for token in order:
            piece = engine.token_bytes(int(token)).decode("utf-8", errors="ignore")
            if piece and text.startswith(written + piece):
                tokens.append(int(token))
                written += piece
                break
        else:
            break  # no candidate continues it (a multi-byte character split): compare what we have
    assert tokens, text
    return tokens


def test_a_client_that_disconnects_frees_its_slot(client, server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "stream": True, "max_tokens": 900, "temperature": 0,
                            "messages": [{"role": "user", "content": "Write a very long story."}]}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert busy_slots(server) == 1 and all(line.startswith("data:") or not line for line in got)
    wait_until_idle(server, 10)  # freed at the next step, long before 900 tokens
    assert ask(client, "Say yes.", max_tokens=4).choices[0].message.content is not None


# -- bad requests ---------------------------------------------------------------------------------------------

def test_bad_requests_get_their_status_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        ask(client, "hi", n=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(client, "hi", max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError, match=r"the prompt is \d+ tokens but the context holds 1024"):
        ask(client, "word " * 3000)
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]\.function\.name"):
        ask(client, "hi", tools=[{"type": "function", "function": {"name": "no spaces", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        ask(client, "hi", logprobs=True)
    deep = '{"type":"object","properties":{"a":' * 5000 + "{}" + "}}" * 5000  # past Python's recursion limit
    head = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})[:-1]
    body = head + ', "tools": [{"type": "function", "function": {"name": "f", "parameters": ' + deep + "}}]}"
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400, r.text
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json() and "Traceback" not in r.text
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"x" * (5 << 20))
    assert r.status_code == 413
    r = httpx.post(f"{server.url}/api/chat", json={"model": "no-such-model", "messages": []})
    assert r.status_code == 404 and set(r.json()) == {"error"}
    r = httpx.post(f"{server.url}/api/generate", json={"model": MODEL, "prompt": "hi", "template": "{{ evil }}"})
    assert r.status_code == 400 and "template" in r.json()["error"]
    assert ask(client, "Say yes.", max_tokens=4).choices[0].message.content is not None  # still serving


def test_a_non_loopback_address_needs_a_key(cli):
    result = cli("serve", "--host", "0.0.0.0", "--port", "1")
    assert result.returncode != 0 and "--api-key" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_api_key_is_required_when_set(tmp_path: Path):
    with ServerProcess("--api-key", "s3cret", env={"TMPDIR": str(tmp_path)}) as s:
        r = httpx.get(f"{s.url}/v1/models")
        assert r.status_code == 401
        ok = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
        assert MODEL in [m.id for m in ok.models.list()]


# -- shutdown -------------------------------------------------------------------------------------------------

def test_sigterm_mid_stream_ends_the_stream_cleanly_and_leaves_no_swap_file(tmp_path: Path):
    s = ServerProcess("--model", MODEL, env={"TMPDIR": str(tmp_path)}).start()
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=60)
        stream = c.chat.completions.create(model=MODEL, stream=True, max_tokens=900, temperature=0,
                                           messages=[{"role": "user", "content": "Write a very long story."}])
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:
                s.proc.terminate()  # SIGTERM while the reply streams
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"] and len(chunks) < 900  # a last chunk, then [DONE]: the stream ended cleanly
        assert json.loads(chunks[-1].model_dump_json())["x_edgellm"]["finish_reason"] == "cancelled"
        code = s.proc.wait(60)  # the one SIGTERM: it exits by itself
    finally:
        s.stop()
    assert code == 0, "".join(s.output)
    assert swap_leftovers(tmp_path) == []


# -- soak -----------------------------------------------------------------------------------------------------

def process_figures(pid: int) -> tuple[int, int, int]:
    """(RSS in KiB, open file descriptors, threads) of a process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]), len(list(Path(f"/proc/{pid}/fd").iterdir())), int(status["Threads"])


def settled_figures(pid: int, fds0: int, threads0: int, timeout: float = 20.0) -> tuple[int, int, int]:
    """The figures once the server has closed its side of the connections the clients closed.

    uvicorn closes a socket on its event loop after the peer's FIN, so a /proc read just after the last
    reply can still count one; a leak stays however long we poll, a closing socket does not.
    """
    deadline = time.monotonic() + timeout
    while True:
        figures = process_figures(pid)
        if (figures[1] <= fds0 and figures[2] <= threads0) or time.monotonic() > deadline:
            return figures
        time.sleep(0.05)  # polls the condition itself, bounded by the deadline


def mixed_requests(server: ServerProcess, count: int, workers: int = 4) -> list[str]:
    """`count` requests of every kind from `workers` clients at once; every fifth stream is dropped early."""
    failures: list[str] = []

    def work(w: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as http, ollama.Client(host=server.url) as ol:
            oa = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, http_client=http)
            for i in range(w, count, workers):
                try:
                    kind = i % 5
                    if kind == 0:
                        ask(oa, f"Say a number near {i}.", max_tokens=12)
                    elif kind == 1:
                        streamed(oa, f"Name an animal, number {i}.", max_tokens=12)
                    elif kind == 2:
                        oa.completions.create(model=MODEL, prompt=f"{i} plus one is", max_tokens=8, temperature=0)
                    elif kind == 3:
                        list(ol.chat(model=MODEL, messages=[{"role": "user", "content": f"Hi {i}"}], stream=True,
                                     options={"num_predict": 12}))
                    else:  # a client that goes away mid-stream
                        with http.stream("POST", "/v1/chat/completions", json={
                                "model": MODEL, "stream": True, "max_tokens": 200,
                                "messages": [{"role": "user", "content": f"Tell a long tale {i}."}]}) as r:
                            lines = r.iter_lines()
                            next(lines)
                            next(lines)
                except Exception as e:  # collected: every request must succeed
                    failures.append(f"{i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return failures


def test_soak_200_mixed_requests_keep_rss_fds_and_threads_flat(server: ServerProcess):
    pid = server.proc.pid
    assert mixed_requests(server, 40) == []  # warm-up: allocators, thread pools, the cost curve
    wait_until_idle(server)
    rss0, fds0, threads0 = process_figures(pid)
    assert mixed_requests(server, 200) == []
    wait_until_idle(server)
    rss1, fds1, threads1 = settled_figures(pid, fds0, threads0)
    assert rss1 <= rss0 * 1.05, (rss0, rss1)
    assert fds1 <= fds0 and threads1 <= threads0, ((fds0, threads0), (fds1, threads1))
    assert ask(openai.OpenAI(base_url=f"{server.url}/v1", api_key="x"), "Say yes.", max_tokens=4).choices


def test_a_port_in_use_is_refused_in_one_line(cli):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli("serve", "--port", str(taken.getsockname()[1]))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("edgellm: could not serve"), lines
