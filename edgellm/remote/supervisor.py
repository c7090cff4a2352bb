"""The parent side of a split model: the reply survives a worker that goes away.

A child process (child.py) holds the model and sends the reply's tokens; this side runs the one emitter over
them (text, stop strings, finish reasons, stats), so the text the reader has seen is the parent's. When the
child ends without saying the reply ended, each worker is checked: the ones that are gone are dropped, the
load is planned again without them (`replan`), and a new child prefills the prompt plus the tokens so far and
goes on. Greedy decoding then gives the text an uninterrupted run gives. When nothing is gone the child
failed on its own, and when the rest does not fit without the workers, the reply ends with one line and
keeps its text.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

from edgellm.decoding.emitter import Emitter
from edgellm.decoding.records import Record, Stats
from edgellm.errors import EdgeLLMError
from edgellm.runtime.engine import LoadOptions
from edgellm.runtime.rpc import RpcError, check, parse_endpoints
from edgellm.runtime.sampling import SamplingParams


class _Pieces:
    """The vocabulary the emitter needs, from what the child sent (each token's bytes); ends come as messages."""

    def __init__(self) -> None:
        self.bytes: dict[int, bytes] = {}

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return self.bytes[token]

    def is_eog(self, token: int) -> bool:
        return False  # the child says "end" instead of sending an end-of-generation token


class Child:
    def __init__(self, request: dict[str, Any]) -> None:
        # a lost worker makes llama.cpp abort the child: without GGML_NO_BACKTRACE its abort first attaches gdb
        # (where installed) to print a backtrace, seconds before the parent can go on
        self.proc = subprocess.Popen([sys.executable, "-m", "edgellm.remote.child"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "GGML_NO_BACKTRACE": "1"})
        self.log: deque[str] = deque(maxlen=20)  # its stderr: llama.cpp's abort text, kept for the error line
        threading.Thread(target=self._drain, daemon=True).start()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:  # it died at once: its stdout ends, and the caller finds out why
            pass

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())

    def messages(self) -> Iterator[dict[str, Any]]:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            yield json.loads(line)

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()


def gone(endpoints: Sequence[str]) -> list[str]:
    """The workers that no longer answer the protocol's handshake."""
    out = []
    for endpoint in parse_endpoints(",".join(endpoints)):
        try:
            check(endpoint, timeout=3.0)
        except RpcError:
            out.append(str(endpoint))
    return out


def generate(path: str, options: LoadOptions, sampling: SamplingParams, prompt: dict[str, Any], max_tokens: int,
             stop: Sequence[str] = (), draft: str | None = None,
             replan: Callable[[tuple[str, ...]], LoadOptions] | None = None) -> Iterator[Record]:
    """Records of one reply from a child process. `prompt`: {"messages": [...]}, {"text": ...} or
    {"tokens": [...]}. `replan(workers)`: the load options without the workers that went away (EdgeLLMError
    when the rest does not fit)."""
    pieces = _Pieces()
    emitter: Emitter | None = None
    prompt_tokens: list[int] = []
    generated: list[int] = []
    request = {"path": str(path), "sampling": asdict(sampling), "draft": draft, **prompt}
    while True:
        fields = asdict(options)
        fields.pop("eval_callback")
        request.update(options=fields, max_tokens=max_tokens - len(generated))
        child = Child(request)
        try:
            for message in child.messages():
                if "ready" in message:
                    if emitter is None:  # the first child: the reply's emitter starts with the model loaded
                        ready = message["ready"]
                        prompt_tokens = ready["prompt"]
                        emitter = Emitter(pieces, len(prompt_tokens), ready["n_ctx"], [*stop, *ready["stops"]],
                                          max_tokens)
                        emitter.prefilled(len(prompt_tokens))
                    continue
                if "error" in message:
                    raise EdgeLLMError(message["error"])
                assert emitter is not None
                if "e" in message:
                    yield emitter.event(message["e"])
                elif "t" in message:
                    token = int(message["t"])
                    pieces.bytes.setdefault(token, bytes.fromhex(message["b"]))
                    generated.append(token)
                    record = emitter.emit(token, bool(message["d"]))
                    yield record
                    if record.finish_reason:
                        return
                elif "end" in message:
                    yield emitter.end(message["end"])
                    return
        finally:
            code = child.close()
        # the child ended without saying the reply ended: a worker went away, or it failed on its own
        lost = gone(options.rpc)
        if not lost or replan is None:
            last = next((line for line in reversed(child.log) if line.strip()), f"exit status {code}")
            raise EdgeLLMError(f"the split model's process ended: {last}")
        left = tuple(e for e in options.rpc if e not in lost)
        note = (f"worker {', '.join(lost)} went away after {len(generated)} token(s); "
                f"going on {'with ' + ', '.join(left) if left else 'here alone'}")
        try:
            options = replan(left)
        except EdgeLLMError as e:
            if emitter is None:  # nothing was said yet: nothing to keep
                raise EdgeLLMError(f"{note}: {e}") from None
            yield emitter.end("error", event=f"{note}: {e}")
            return
        yield emitter.event(note) if emitter is not None else Record("", None, Stats(), event=note)
        if emitter is not None:  # the prompt as the first child tokenized it, and the reply so far
            request = {**request, "messages": None, "text": None, "tokens": [*prompt_tokens, *generated]}
