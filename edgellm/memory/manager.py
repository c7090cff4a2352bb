"""The model manager: one per process; every load goes through it (the CLI, the chat, a server).

It resolves and plans a model, loads it under a memory budget, shares a loaded model between sessions,
keeps idle models for a keep-alive and evicts the least recently used, queues a load that does not fit
yet (until another is released, or `wait_s`), and refuses one that never can, with the numbers, before
loading. A model's charge against the budget is its plan's peak less the process base (which is paid once).

An idle model whose keep-alive runs out is unloaded by a timer, on the llama thread (backend.llama_thread),
as every llama.cpp call of an app; loads and evictions run on the thread that calls `acquire`.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import read_info
from edgellm.memory.plan import Plan, PlanRequest, default_ram_budget, fmt, make_plan, process_base
from edgellm.runtime.backend import llama_thread
from edgellm.runtime.engine import Engine, LoadOptions

DEFAULT_KEEP_ALIVE_S = 300.0  # as Ollama's default
DEFAULT_WAIT_S = 60.0  # a load that waits this long for memory is refused: a caller never hangs on it


@dataclass
class Loaded:
    path: Path
    key: tuple
    engine: Engine
    plan: Plan
    charge: int  # bytes held against the budget
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


@lru_cache(maxsize=1)
def process_manager() -> ModelManager:
    """The process's one manager: the CLI, the chat and a server load through it."""
    return ModelManager()


class ModelManager:
    def __init__(self, budget: int | None = None, keep_alive_s: float = DEFAULT_KEEP_ALIVE_S,
                 load: Callable[[Path, LoadOptions], Engine] = Engine, wait_s: float = DEFAULT_WAIT_S) -> None:
        # bytes for models, beside what the process holds now
        self.budget = budget if budget is not None else default_ram_budget()
        self.keep_alive_s = keep_alive_s
        self.wait_s = wait_s
        self._load = load
        self._models: list[Loaded] = []
        self._cond = threading.Condition()  # guards the models, the events and the timer
        self._timer: threading.Timer | None = None
        self._expiry_queued = False  # one expire job at most waits on the llama thread (a server's loop may hold it)
        self.events: deque[str] = deque(maxlen=256)  # what the manager did, in words (loads, evictions, waits)

    @property
    def used(self) -> int:
        with self._cond:
            return sum(m.charge for m in self._models)

    def loaded(self) -> list[Path]:
        with self._cond:
            return [m.path for m in self._models]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until `predicate()` holds, checked under the manager's lock at each change (a load, an
        unload, a release, an event); False when `timeout` ran out first."""
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def _note(self, event: str) -> None:
        self.events.append(event)
        self._cond.notify_all()

    @contextmanager
    def use(self, path: str | Path, request: PlanRequest | None = None, timeout: float | None = None,
            **options) -> Iterator[Engine]:
        """An engine for `path` while the block runs: shared with other users of the same settings."""
        loaded = self.acquire(path, request, timeout, **options)
        try:
            yield loaded.engine
        finally:
            self.release(loaded)

    def acquire(self, path: str | Path, request: PlanRequest | None = None, timeout: float | None = None,
                plan: Plan | None = None, **options) -> Loaded:
        """`plan`: one already made for this request (options.planned_load), not made again.

        A load that does not fit waits for a release up to `timeout` (None: the manager's `wait_s`), then
        raises EdgeLLMError with the numbers.
        """
        path = Path(path)  # as given: a hub cache's symlink keeps the name the user knows
        request = request or PlanRequest()
        key = (path.resolve(), request, tuple(sorted(options.items())))
        timeout = self.wait_s if timeout is None else timeout
        waiting = False
        with self._cond:
            self.expire()
            shared = self._share(key)
            if shared is not None:
                return shared
        # the plan against the whole budget, outside the lock (a dry run takes a moment and a release
        # must not wait for it): a model that can never fit is refused now
        if plan is None:
            plan = make_plan(read_info(path), replace(request, ram=self.budget + process_base()))
        charge = plan.peak_bytes - plan.base_bytes
        deadline = time.monotonic() + timeout
        with self._cond:
            while (shared := self._share(key)) is None and self.used + charge > self.budget:
                if self._evict_one():
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EdgeLLMError(f"{path.name} needs {fmt(charge)} and {fmt(self.budget - self.used)} of "
                                       f"{fmt(self.budget)} is free; the models in use did not finish in time "
                                       f"({timeout:g} s): close what uses them, or pick a smaller model")
                if not waiting:  # once: each note wakes every waiter
                    waiting = True
                    self._note(f"waiting: {path.name} needs {fmt(charge)}, {fmt(self.budget - self.used)} free")
                self._cond.wait(left)
            if shared is not None:  # another user loaded it meanwhile
                return shared
            engine = self._load(path, plan.load_options(**options))
            loaded = Loaded(path, key, engine, plan, charge, users=1)
            self._models.append(loaded)
            self._note(f"loaded {path.name} ({fmt(charge)})")
            return loaded

    def _share(self, key: tuple) -> Loaded | None:
        for m in self._models:
            if m.key == key:
                m.users += 1
                m.last_used = time.monotonic()
                return m
        return None

    def release(self, loaded: Loaded) -> None:
        """Done with it: kept for the keep-alive (a timer unloads it then), evicted sooner when a load needs
        the room."""
        with self._cond:
            loaded.users -= 1
            loaded.last_used = time.monotonic()
            self._cond.notify_all()
            self._schedule()

    def _evict_one(self) -> bool:
        idle = [m for m in self._models if m.users == 0]
        if not idle:
            return False
        self._unload(min(idle, key=lambda m: m.last_used), "evicted")
        return True

    def _unload(self, m: Loaded, why: str) -> None:
        self._models.remove(m)
        m.engine.close()
        self._note(f"{why} {m.path.name} ({fmt(m.charge)})")

    def unload(self, loaded: Loaded) -> None:
        """Unload a model nobody uses now (a server's own keep-alive ran out); call it on the llama thread."""
        with self._cond:
            if loaded in self._models and loaded.users == 0:
                self._unload(loaded, "unloaded")
            self._schedule()

    def expire(self) -> None:
        """Unload idle models whose keep-alive has run out (the timer runs this on the llama thread)."""
        now = time.monotonic()
        with self._cond:
            for m in [m for m in self._models if m.users == 0 and now - m.last_used >= self.keep_alive_s]:
                self._unload(m, "unloaded after keep-alive")
            self._schedule()

    def _schedule(self) -> None:
        """(under the lock) One timer, for the idle model whose keep-alive runs out first."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        idle = [m.last_used for m in self._models if m.users == 0]
        if not idle or math.isinf(self.keep_alive_s):  # kept for good (a server's driver unloads them itself)
            return
        self._timer = threading.Timer(max(0.0, min(idle) + self.keep_alive_s - time.monotonic()), self._expire_later)
        self._timer.name = "edgellm-keep-alive"
        self._timer.daemon = True  # an idle model does not keep the process alive
        self._timer.start()

    def _expire_later(self) -> None:
        # engine.close is a llama.cpp call: it runs on the llama thread, after the work queued there
        with self._cond:
            if self._expiry_queued:
                return
            self._expiry_queued = True
        with contextlib.suppress(RuntimeError):  # the interpreter is shutting down
            llama_thread().submit(self._queued_expire)

    def _queued_expire(self) -> None:
        with self._cond:
            self._expiry_queued = False
            self.expire()

    def close(self) -> None:
        """Unload every model and stop the timer (call it on the thread that runs llama.cpp)."""
        with self._cond:
            for m in list(self._models):
                self._unload(m, "closed")
            self._schedule()
