"""A chat session over the engine: the message history, and one sync and one async way to stream a reply.

The line-mode chat, the Textual app and the tests all drive the engine through this class.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, Record
from .sampling import SamplingParams


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
        """`send` for asyncio apps: decoding runs in a worker thread, records arrive through a queue.

        Closing the iterator early (a Stop button) cancels the generation at the next token.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Record | BaseException | None] = asyncio.Queue()
        cancel = threading.Event()

        def work() -> None:
            try:
                for record in self.send(text, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, record)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as e:  # handed to the awaiting side
                loop.call_soon_threadsafe(queue.put_nowait, e)

        worker = loop.run_in_executor(None, work)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            await worker
