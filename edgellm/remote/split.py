"""The parent side of a split model: a scheduler whose model lives in a child process (host.py).

It offers what `run`, the chat and the server's driver use of a Scheduler (`submit`, `step`, `active`, `cells`,
`close`), and keeps each request's emitter here, on the model's vocabulary (loaded vocabulary-only: no
weights), so the text a reader has seen is this process's. When the child ends, each worker is checked; the
lost ones are dropped, the load is planned again without them (`replan`), a new child loads the rest, and
every running request goes on from its prompt plus the tokens it has so far, after a one-line note. When
nothing is lost the child failed on its own; when the rest does not fit, the running requests end with one
line each, keeping their text, and the model refuses new ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.decoding.emitter import Emitter
from edgellm.decoding.records import Record
from edgellm.errors import EdgeLLMError
from edgellm.memory.scheduler import check_prompt
from edgellm.runtime.engine import LoadOptions
from edgellm.runtime.model import Model
from edgellm.runtime.rpc import RpcError, check, parse_endpoints
from edgellm.runtime.sampling import SamplingParams

READY_S = 240.0  # a split load sends the weights once over the network (the app waits 300 s for a load)
STALL_S = 60.0  # EDGELLM_RPC_STALL_S: see stall_s()


@dataclass(eq=False)
class SplitRequest:
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    emitter: Emitter
    ignore_eog: bool = False
    cancel: threading.Event | None = None
    records: list[Record] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    done: bool = False
    rid: int = -1  # its id with the current child

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.records)


def gone(endpoints: Sequence[str]) -> list[str]:
    """The workers that no longer answer the protocol's handshake."""
    out = []
    for endpoint in parse_endpoints(",".join(endpoints)) if endpoints else ():
        try:
            check(endpoint, timeout=3.0)
        except RpcError:
            out.append(str(endpoint))
    return out


def stall_s() -> float:
    """How long a child with running requests may send nothing before it is taken for stuck: a worker that
    vanished without closing its connection (power, network) leaves llama.cpp waiting on it for ever."""
    text = os.environ.get("EDGELLM_RPC_STALL_S", "")
    try:
        value = float(text) if text.strip() else STALL_S
    except ValueError:
        raise EdgeLLMError(f"EDGELLM_RPC_STALL_S must be a number of seconds (got {text!r})") from None
    if not value > 0:
        raise EdgeLLMError(f"EDGELLM_RPC_STALL_S must be above 0 (got {text!r})")
    return value


class _Host:
    """One child process and the threads that read its channel into a queue (None: it ended) and its stderr."""

    def __init__(self, path: Path, options: LoadOptions, notify: Callable[[], None] | None = None) -> None:
        fields = asdict(options)
        fields.pop("eval_callback")
        self.notify = notify
        # its own session: a Ctrl-C at the terminal is the parent's (a stopped reply), not the model's end.
        # Without GGML_NO_BACKTRACE llama.cpp's abort first attaches gdb (where installed): seconds of pause
        self.proc = subprocess.Popen([sys.executable, "-m", "edgellm.remote.host"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, "GGML_NO_BACKTRACE": "1"}, start_new_session=True)
        self.inbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.log: deque[str] = deque(maxlen=20)  # its stderr: llama.cpp's abort text, for the error line
        self.error: str | None = None  # what the child said before it ended
        threading.Thread(target=self._read, daemon=True).start()
        self._stderr = threading.Thread(target=self._drain, daemon=True)
        self._stderr.start()
        self.send({"path": str(path), "options": fields})

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._put(json.loads(line))
        self._put(None)

    def _put(self, message: dict[str, Any] | None) -> None:
        self.inbox.put(message)
        if self.notify is not None:
            self.notify()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def send(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(command, separators=(",", ":")) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):  # it has ended: its channel's end says so
            pass

    def ready(self) -> dict[str, Any]:
        """Wait for the loaded model's shape; EdgeLLMError with the child's line when it could not load."""
        try:
            message = self.inbox.get(timeout=READY_S)
        except queue.Empty:
            self.close()
            raise EdgeLLMError(f"the split model did not load in {READY_S:.0f} s") from None
        if message is not None and "ready" in message:
            return message["ready"]
        self.close()
        raise EdgeLLMError(message["error"] if message else f"the split model's process ended: {self.last_line()}")

    def last_line(self) -> str:
        """Why it ended: its own error line, else the last line on its stderr (llama.cpp's abort)."""
        if self.error:
            return self.error
        self._stderr.join(timeout=2.0)  # the pipe closes as the process ends
        return next((line for line in reversed(list(self.log)) if line.strip()),
                    f"exit status {self.proc.returncode}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def close(self, timeout: float = 10.0) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ValueError, OSError):
                self.proc.stdin.close()  # the child closes the model (on its llama thread) and ends
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class SplitScheduler:
    """Drive it from one thread, as a Scheduler: `submit`, then `step` while `active`."""

    def __init__(self, path: Path, options: LoadOptions,
                 replan: Callable[[tuple[str, ...]], LoadOptions] | None = None,
                 notify: Callable[[], None] | None = None) -> None:
        """`replan(workers)`: the load options without the workers that went away (EdgeLLMError when the
        rest does not fit). `notify`: called from another thread whenever the child has sent something (a
        driver that steps several models waits on it)."""
        self.path, self.options, self.replan, self.notify = Path(path), options, replan, notify
        self.stall_s = stall_s()
        self.vocab = Model(path, vocab_only=True)
        self.engine = self.vocab  # what callers tokenize with (the driver's `served.engine`)
        try:
            self._host = _Host(self.path, options, notify)
            shape = self._host.ready()
        except BaseException:
            self.vocab.close()
            raise
        self.n_ctx, self.cells = shape["n_ctx"], shape["cells"]
        self.slots = list(range(shape["slots"]))
        self.active: list[SplitRequest] = []
        self.waiting: list[SplitRequest] = []  # the child queues; nothing waits here
        self.accepting = True
        self.broken: str | None = None  # why no request is taken any more
        self._ids: dict[int, SplitRequest] = {}
        self._next_id = 0
        self._heard = time.monotonic()  # the child's last line, while requests run
        self.events: deque[str] = deque(maxlen=256)  # notes for the owner's log (a worker gone)
        self.lost: set[str] = set()  # workers that went away

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(self.options.rpc)

    def submit(self, prompt: Sequence[int], sampling: SamplingParams | None = None, max_tokens: int = 256,
               stop: Sequence[str] = (), ignore_eog: bool = False, session: str | None = None,
               cancel: threading.Event | None = None) -> SplitRequest:
        if self.broken:
            raise EdgeLLMError(self.broken)
        check_prompt(prompt, self.cells, self.vocab.n_vocab)
        emitter = Emitter(self.vocab, len(prompt), self.cells, stop, max_tokens, cancel, ignore_eog)
        emitter.prefilled(len(prompt))
        request = SplitRequest(list(prompt), sampling or SamplingParams(), max_tokens, emitter, ignore_eog, cancel)
        if not self.active:
            self._heard = time.monotonic()  # the watchdog counts from the first running request
        self._start(request)
        self.active.append(request)
        return request

    def generate(self, prompt: Sequence[int], **kwargs) -> Iterator[Record]:
        """Submit one request and step until it is done, yielding its records (others advance too)."""
        request = self.submit(prompt, **kwargs)
        seen = 0
        try:
            while not request.done:
                self.step()
                yield from request.records[seen:]
                seen = len(request.records)
        finally:
            if not request.done:  # the caller stopped reading: the child stops too
                self._finish(request, request.emitter.end("cancelled"))
        yield from request.records[seen:]

    def _start(self, request: SplitRequest) -> None:
        request.rid, self._next_id = self._next_id, self._next_id + 1
        self._ids[request.rid] = request
        self._host.send({"submit": request.rid, "tokens": [*request.prompt, *request.generated],
                         "sampling": asdict(request.sampling), "resume": len(request.generated),
                         "max_tokens": request.max_tokens - len(request.generated), "ignore_eog": request.ignore_eog})

    def _finish(self, request: SplitRequest, record: Record) -> None:
        request.records.append(record)
        request.done = True
        if self._ids.pop(request.rid, None) is not None:
            self._host.send({"cancel": request.rid})  # a no-op where the child ended it already
        self.active = [r for r in self.active if r is not request]

    # -- one step ---------------------------------------------------------------------------------
    def step(self, wait_s: float = 0.25) -> bool:
        """Take what the child made since the last step (waiting up to `wait_s` for its first line). False
        when nothing runs."""
        for r in [r for r in self.active if r.emitter.cancelled]:
            self._finish(r, r.emitter.end("cancelled"))
        if not self.active:
            return False
        try:
            message = self._host.inbox.get(timeout=wait_s) if wait_s > 0 else self._host.inbox.get_nowait()
        except queue.Empty:
            if time.monotonic() - self._heard > self.stall_s:  # stuck on a worker that vanished: its end
                self._host.kill()                                # is the failover's start
            return True
        self._heard = time.monotonic()
        while True:
            if message is None:
                self._failover()
                return bool(self.active)
            self._take(message)
            try:
                message = self._host.inbox.get_nowait()
            except queue.Empty:
                return bool(self.active)

    def _take(self, message: dict[str, Any]) -> None:
        if "error" in message:  # the child's last words; its end follows
            self._host.error = str(message["error"])
            return
        request = self._ids.get(message.get("id", -1))
        if request is None or request.done:  # ended here already (a stop string, a cancel), or a heartbeat
            return
        if "t" in message:
            token = int(message["t"])
            request.generated.append(token)
            record = request.emitter.emit(token, bool(message["d"]))
            if record.finish_reason:
                self._finish(request, record)
            else:
                request.records.append(record)
        elif "e" in message:
            request.records.append(request.emitter.event(message["e"]))
        elif "end" in message:
            self._finish(request, request.emitter.end(message["end"], event=message.get("why")))

    def _failover(self) -> None:
        """The child ended: go on without the workers that are gone, or end the running requests."""
        old, host = self._host, None
        try:
            old.close(timeout=5.0)
            stalled = old.proc.returncode == -9 and not old.error  # killed by the watchdog
            last = (f"it sent nothing for {self.stall_s:.0f} s" if stalled else
                    old.last_line() if old.proc.returncode else "it ended")
            lost = gone(self.workers)
            if not lost or self.replan is None:
                self._end_all(f"the split model's process ended: {last}")
                return
            self.lost.update(lost)
            left = tuple(e for e in self.workers if e not in lost)
            rest = f"going on {'with ' + ', '.join(left) if left else 'here alone'}"
            note = f"worker {', '.join(lost)} went away; {rest}"
            self.events.append(note)
            try:
                options = self.replan(left)
                host = _Host(self.path, options, self.notify)
                shape = host.ready()
            except EdgeLLMError as e:
                self._end_all(f"{note}: {e}")
                return
            self._host, self.options, host = host, options, None
            self.n_ctx, self.cells = shape["n_ctx"], shape["cells"]
            self.slots = list(range(shape["slots"]))
            self._ids.clear()
            self._heard = time.monotonic()
            for request in self.active:
                request.records.append(request.emitter.event(
                    f"worker {', '.join(lost)} went away after {len(request.generated)} token(s); {rest}"))
                self._start(request)
        except Exception as e:  # never a request left running on nothing
            self._end_all(f"the split model could not go on: {e}")
        finally:
            if host is not None:  # started, then given up
                host.kill()
                host.close()

    def _end_all(self, why: str) -> None:
        self.broken = why
        self.accepting = False
        for request in list(self.active):
            self._finish(request, request.emitter.end("error", event=why))

    def close(self) -> None:
        self._host.close()
        self.vocab.close()


class SplitEngine:
    """A split model as a chat uses an Engine: replies through a SplitScheduler, whose child keeps the
    conversation's KV cache between turns (a slot reuses the longest common prefix). No speculator: the
    child's scheduler drafts by lookup where its cost curve says it pays."""

    def __init__(self, path: Path, options: LoadOptions,
                 replan: Callable[[tuple[str, ...]], LoadOptions] | None = None) -> None:
        self.scheduler = SplitScheduler(path, options, replan)
        self.weights = self.scheduler.vocab
        self.info, self.path = self.weights.info, self.weights.path
        self.kv_tokens: list[int] = []  # the KV cache is the child's

    @property
    def n_ctx(self) -> int:
        return self.scheduler.cells

    @property
    def is_chat_model(self) -> bool:
        return self.weights.is_chat_model

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.weights.tokenize(text, add_special, parse_special)

    def turn_stops(self) -> list[str]:
        return self.weights.turn_stops()

    def chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.weights.chat_tokens(messages, tools)

    def generate(self, prompt: Sequence[int], sampling: SamplingParams | None = None, max_tokens: int = 256,
                 stop: Sequence[str] = (), cancel: threading.Event | None = None, ignore_eog: bool = False,
                 speculator: Any = None) -> Iterator[Record]:
        """As Engine.generate; `speculator` is not used (the child drafts by lookup where that pays)."""
        return self.scheduler.generate(prompt, sampling=sampling, max_tokens=max_tokens, stop=stop, cancel=cancel,
                                       ignore_eog=ignore_eog)

    def chat(self, messages: list[dict[str, Any]], stop: Sequence[str] = (), **kwargs) -> Iterator[Record]:
        return self.generate(self.chat_tokens(messages), stop=[*stop, *self.turn_stops()], **kwargs)

    def reset(self) -> None:
        """A new conversation: nothing to do here (the child's slot keeps only a common prefix)."""

    def close(self) -> None:
        self.scheduler.close()
