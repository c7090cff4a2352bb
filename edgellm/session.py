"""A chat session over the engine: the message history, and one sync and one async way to stream a reply.

The line-mode chat, the Textual app and the tests all drive the engine through this class.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from edgellm.decoding.records import Record
from edgellm.runtime.backend import llama_thread
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams


@dataclass
class ChatSession:
    engine: Engine
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_tokens: int = 512
    system: str | None = None
    stop: tuple[str, ...] = ()
    messages: list[dict[str, str]] = field(default_factory=list)
    speculator: Any = None  # speculative.setup.Speculator, or None for plain decoding

    def __post_init__(self) -> None:
        if self.system and not self.messages:
            self.messages.append({"role": "system", "content": self.system})

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]

    def send(self, text: str, cancel: threading.Event | None = None) -> Iterator[Record]:
        """Add a user message and stream the assistant's reply; the reply joins the history at the end."""
        self.messages.append({"role": "user", "content": text})
        reply = []
        try:
            for record in self.engine.chat(self.messages, sampling=self.sampling, max_tokens=self.max_tokens,
                                           stop=self.stop, cancel=cancel, speculator=self.speculator):
                reply.append(record.text)
                yield record
        except BaseException:
            self.messages.pop()  # a failed turn leaves the history as it was
            raise
        self.messages.append({"role": "assistant", "content": "".join(reply)})

    async def asend(self, text: str) -> AsyncIterator[Record]:
        """`send` for asyncio apps: decoding runs in a worker thread, records arrive as they are made.

        Closing the iterator early (a Stop button) cancels the generation at the next token.
        """
        async with aclosing(self.asend_frames(text, frame_s=0.0)) as frames:
            async for frame in frames:
                for record in frame:
                    yield record

    async def asend_frames(self, text: str, frame_s: float = 1 / 10) -> AsyncIterator[list[Record]]:
        """`asend` for a UI: the records made since the last frame, one list per `frame_s`.

        The decode thread only appends to a list and the event loop looks at it once per frame: on a
        2-core machine every wake-up of the UI thread takes a core from the decode, so it must not wake
        per token. With `frame_s` 0 the loop is woken for each batch instead (tests, servers).
        """
        loop = asyncio.get_running_loop()
        pending: list[Record | BaseException | None] = []
        lock = threading.Lock()
        wake = asyncio.Event()
        cancel = threading.Event()

        def post(item: Record | BaseException | None) -> None:
            with lock:
                first = not pending
                pending.append(item)
            if first and not frame_s:
                loop.call_soon_threadsafe(wake.set)

        def work() -> None:
            try:
                for record in self.send(text, cancel):
                    post(record)
                post(None)
            except BaseException as e:  # handed to the awaiting side
                post(e)

        worker = loop.run_in_executor(llama_thread(), work)
        try:
            while True:
                if frame_s:
                    await asyncio.sleep(frame_s)
                else:
                    await wake.wait()
                with lock:
                    items = pending[:]
                    pending.clear()
                    wake.clear()
                records = [i for i in items if isinstance(i, Record)]
                if records:
                    yield records
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item is None:
                        return
        finally:
            cancel.set()
            await worker
