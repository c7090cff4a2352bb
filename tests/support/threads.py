"""Test doubles that make a race between the UI thread and the llama thread happen on purpose."""

from __future__ import annotations

import asyncio
import threading
from contextlib import closing
from dataclasses import fields

from edgellm.runtime.backend import llama_thread
from edgellm.runtime.engine import Engine
from edgellm.speculative.setup import Speculator, make_speculator


class DecodeAhead:
    """Wraps `engine.chat` to count the records the decode makes, so a test can wait until the decode is
    past what a consumer took (the records a stop must not keep)."""

    def __init__(self, engine: Engine, monkeypatch) -> None:
        self.made = 0
        self._target: int | None = None
        self._ahead = threading.Event()
        real = engine.chat

        def chat(messages, **kwargs):
            with closing(real(messages, **kwargs)) as records:
                for record in records:
                    self.made += 1
                    if self._target is not None and self.made >= self._target:
                        self._ahead.set()
                    yield record

        monkeypatch.setattr(engine, "chat", chat)

    async def run_ahead(self, of: int, by: int = 5) -> None:
        """Wait until the decode has made `by` records more than `of`."""
        self._ahead.clear()
        self._target = of + by
        if self.made >= self._target:
            self._ahead.set()
        assert await asyncio.get_running_loop().run_in_executor(None, self._ahead.wait, 60), "the decode stalled"


class WatchedEngines:
    """A model manager's `load`: engines that record the thread that closed them."""

    def __init__(self) -> None:
        self.closed_on: list[str] = []
        self.closed = threading.Event()

    def __call__(self, path, options) -> Engine:
        watch = self

        class Watched(Engine):
            def close(self) -> None:
                if getattr(self, "ctx", None):  # the first close, not __del__'s after it
                    watch.closed_on.append(threading.current_thread().name)
                    watch.closed.set()
                super().close()

        return Watched(path, options)


class WatchedSpeculator(Speculator):
    """A speculator that records the thread that closed it and how many replies were using it then."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_use = 0
        self.started = threading.Event()  # a reply is decoding with it
        self.closes: list[tuple[str, int]] = []

    def steps(self, *args, **kwargs):
        self.in_use += 1
        self.started.set()
        try:
            yield from super().steps(*args, **kwargs)
        finally:
            self.in_use -= 1

    def close(self) -> None:
        self.closes.append((threading.current_thread().name, self.in_use))
        super().close()


def watched_speculator(engine: Engine, spec: str = "edit") -> WatchedSpeculator:
    made = llama_thread().submit(make_speculator, engine, spec).result(60)
    return WatchedSpeculator(**{f.name: getattr(made, f.name) for f in fields(made)})
