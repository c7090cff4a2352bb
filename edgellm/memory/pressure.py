"""Memory pressure while generating: MemAvailable read now and then, against a margin."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgellm.memory.plan import margin, mem_available


@dataclass
class MemoryWatch:
    margin: int  # bytes that must stay available for the rest of the machine
    available: Callable[[], int] = mem_available
    interval_s: float = 0.25  # reading /proc/meminfo costs ~20 us; a step of a small model ~6 ms
    _next: float = field(default=0.0, repr=False)
    _low: bool = field(default=False, repr=False)

    def low(self) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval_s
            self._low = self.available() < self.margin
        return self._low


def default_watch() -> MemoryWatch:
    """The plan's margin, taken from what is available now (memory.plan.margin)."""
    return MemoryWatch(margin(mem_available()))
