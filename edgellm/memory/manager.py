"""The model manager: one per process; every load goes through it (the CLI, the chat, a server).

It resolves and plans a model, loads it under a memory budget, shares a loaded model between sessions,
keeps idle models for a keep-alive and evicts the least recently used, queues a load that does not fit
yet (until another is released), and refuses one that never can, with the numbers, before loading.
A model's charge against the budget is its plan's peak less the process base (which is paid once).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import read_info
from edgellm.memory.plan import Plan, PlanRequest, default_ram_budget, fmt, make_plan, process_base
from edgellm.runtime.engine import Engine, LoadOptions

DEFAULT_KEEP_ALIVE_S = 300.0  # as Ollama's default


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
                 load: Callable[[Path, LoadOptions], Engine] = Engine) -> None:
        # bytes for models, beside what the process holds now
        self.budget = budget if budget is not None else default_ram_budget()
        self.keep_alive_s = keep_alive_s
        self._load = load
        self._models: list[Loaded] = []
        self._cond = threading.Condition()
        self.events: list[str] = []  # what the manager did, in words (loads, evictions, waits)

    @property
    def used(self) -> int:
        return sum(m.charge for m in self._models)

    def loaded(self) -> list[Path]:
        return [m.path for m in self._models]

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
        """`plan`: one already made for this request (options.planned_load), not made again."""
        path = Path(path)  # as given: a hub cache's symlink keeps the name the user knows
        request = request or PlanRequest()
        key = (path.resolve(), request, tuple(sorted(options.items())))
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self.expire()
            for m in self._models:
                if m.key == key:
                    m.users += 1
                    m.last_used = time.monotonic()
                    return m
            # the plan against the whole budget: a model that can never fit is refused now
            if plan is None:
                plan = make_plan(read_info(path), replace(request, ram=self.budget + process_base()))
            charge = plan.peak_bytes - plan.base_bytes
            while self.used + charge > self.budget:
                if self._evict_one():
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise EdgeLLMError(f"{path.name} needs {fmt(charge)} and {fmt(self.budget - self.used)} of "
                                       f"{fmt(self.budget)} is free; the models in use did not finish in time")
                self.events.append(f"waiting: {path.name} needs {fmt(charge)}, "
                                   f"{fmt(self.budget - self.used)} free")
                self._cond.wait(left)
            engine = self._load(path, plan.load_options(**options))
            loaded = Loaded(path, key, engine, plan, charge, users=1)
            self._models.append(loaded)
            self.events.append(f"loaded {path.name} ({fmt(charge)})")
            return loaded

    def release(self, loaded: Loaded) -> None:
        with self._cond:
            loaded.users -= 1
            loaded.last_used = time.monotonic()
            self._cond.notify_all()

    def _evict_one(self) -> bool:
        idle = [m for m in self._models if m.users == 0]
        if not idle:
            return False
        self._unload(min(idle, key=lambda m: m.last_used), "evicted")
        return True

    def _unload(self, m: Loaded, why: str) -> None:
        self._models.remove(m)
        m.engine.close()
        self.events.append(f"{why} {m.path.name} ({fmt(m.charge)})")
        self._cond.notify_all()

    def expire(self) -> None:
        """Unload idle models whose keep-alive has run out."""
        now = time.monotonic()
        with self._cond:
            for m in [m for m in self._models if m.users == 0 and now - m.last_used > self.keep_alive_s]:
                self._unload(m, "unloaded after keep-alive")

    def close(self) -> None:
        with self._cond:
            for m in list(self._models):
                self._unload(m, "closed")
