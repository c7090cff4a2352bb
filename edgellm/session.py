"""A chat session over the engine: the message history, and one sync and one async way to stream a reply.

The line-mode chat, the Textual app and the tests all drive the engine through this class. An app uses
it from two threads: the UI thread starts turns and reads the history, the llama thread decodes. The
history is behind a lock (`messages` is a copy); the speculator belongs to the llama thread, which
swaps and closes it between replies.

A reply joins the history as far as the caller took it: a stream that is stopped or closed early keeps
the records it handed out, the same text the user saw, not what the decode made after.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing, closing
from typing import Any

from edgellm.decoding.records import Record
from edgellm.runtime.backend import llama_thread
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import SamplingParams

Message = dict[str, str]


class ChatSession:
    def __init__(self, engine: Engine, sampling: SamplingParams | None = None, max_tokens: int = 512,
                 system: str | None = None, stop: tuple[str, ...] = (), messages: Sequence[Message] | None = None,
                 speculator: Any = None) -> None:
        self.engine = engine
        # read once per turn, when it starts (on the thread that starts it)
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.max_tokens = max_tokens
        self.system = system
        self.stop = stop
        self.speculator = speculator  # speculative.setup.Speculator, or None for plain decoding
        self._lock = threading.Lock()
        self._messages: list[Message] = [dict(m) for m in messages or ()]
        if system and not self._messages:
            self._messages.append({"role": "system", "content": system})

    @property
    def messages(self) -> list[Message]:
        """A snapshot of the history: safe to read or render while a reply is being made."""
        with self._lock:
            return [dict(m) for m in self._messages]

    @messages.setter
    def messages(self, messages: Sequence[Message]) -> None:
        with self._lock:
            self._messages = [dict(m) for m in messages]

    def reset(self) -> None:
        with self._lock:
            self._messages = [m for m in self._messages if m["role"] == "system"]

    # -- a turn: begin (the user message joins), decode, end (the reply joins, or the user message goes) ----
    def _begin(self, text: str) -> tuple[Message, list[Message], tuple]:
        user = {"role": "user", "content": text}
        with self._lock:
            self._messages.append(user)
            return user, [dict(m) for m in self._messages], (self.sampling, self.max_tokens, self.stop)

    def _decode(self, turn: list[Message], params: tuple, cancel: threading.Event | None) -> Iterator[Record]:
        # on the llama thread: tokenizing the prompt is a llama.cpp call too
        sampling, max_tokens, stop = params
        return self.engine.chat(turn, sampling=sampling, max_tokens=max_tokens, stop=stop, cancel=cancel,
                                speculator=self.speculator)

    def _end(self, user: Message, reply: str | None) -> None:
        """The reply joins the history; None (a failed turn) takes the user message out again."""
        with self._lock:
            if reply is None:
                self._messages = [m for m in self._messages if m is not user]
            else:
                self._messages.append({"role": "assistant", "content": reply})

    def send(self, text: str, cancel: threading.Event | None = None) -> Iterator[Record]:
        """Add a user message and stream the assistant's reply; the reply joins the history at the end.

        Closing the iterator early keeps the reply as far as it was taken; an error leaves the history as
        it was.
        """
        user, turn, params = self._begin(text)
        taken: list[str] = []
        try:
            with closing(self._decode(turn, params, cancel)) as records:
                for record in records:
                    taken.append(record.text)
                    yield record
        except GeneratorExit:
            self._end(user, "".join(taken))
            raise
        except BaseException:
            self._end(user, None)
            raise
        self._end(user, "".join(taken))

    async def asend(self, text: str) -> AsyncIterator[Record]:
        """`send` for asyncio apps: decoding runs on the llama thread, records arrive as they are made.

        Closing the iterator early (a Stop button) cancels the generation at the next token; the reply
        keeps the records yielded.
        """
        taken: list[str] = []
        async with aclosing(self._frames(text, 0.0, taken)) as frames:
            async for frame in frames:
                for record in frame:
                    taken.append(record.text)
                    yield record

    async def asend_frames(self, text: str, frame_s: float = 1 / 10) -> AsyncIterator[list[Record]]:
        """`asend` for a UI: the records made since the last frame, one list per `frame_s`.

        The decode thread only appends to a list and the event loop looks at it once per frame: on a
        2-core machine every wake-up of the UI thread takes a core from the decode, so it must not wake
        per token. With `frame_s` 0 the loop is woken for each batch instead (tests, servers). Closing
        early keeps the frames yielded: the UI shows each frame it takes.
        """
        taken: list[str] = []
        async with aclosing(self._frames(text, frame_s, taken)) as frames:
            async for frame in frames:
                taken.extend(r.text for r in frame)
                yield frame

    async def _frames(self, text: str, frame_s: float, taken: list[str]) -> AsyncIterator[list[Record]]:
        """The stream under `asend` and `asend_frames`; they add to `taken` what they hand out, and that is
        the reply the history keeps."""
        loop = asyncio.get_running_loop()
        user, turn, params = self._begin(text)
        pending: list[Record | BaseException | None] = []
        lock = threading.Lock()
        wake = asyncio.Event()
        cancel = threading.Event()
        failed = False

        def post(item: Record | BaseException | None) -> None:
            with lock:
                first = not pending
                pending.append(item)
            if first and not frame_s:
                loop.call_soon_threadsafe(wake.set)

        def work() -> None:
            try:
                with closing(self._decode(turn, params, cancel)) as records:
                    for record in records:
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
                        failed = True
                        raise item
                    if item is None:
                        return
        finally:
            cancel.set()
            try:
                await worker
            finally:  # records made after the caller stopped taking them were never shown: not kept
                self._end(user, None if failed else "".join(taken))
