"""Process-wide llama.cpp set-up: backend init once, and its log routed to Python's logging.

llama.cpp prints hundreds of lines per model load; they go to the `edgellm.llama` logger at DEBUG
(shown with EDGELLM_VERBOSE=1) instead of the user's terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import llama_cpp as C

log = logging.getLogger("edgellm.llama")
_ready = False
GGML_LOG_LEVEL_ERROR = 4
last_error = ""  # llama.cpp's last error line, to explain a failed load in one line
_captures: list[list[str]] = []  # open `capture()` blocks: each gets every line logged meanwhile
_capture_lock = threading.Lock()


@C.llama_log_callback
def _on_log(level: int, text: bytes, _user: object) -> None:
    global last_error
    line = text.decode("utf-8", errors="replace") if text else ""
    if os.environ.get("EDGELLM_VERBOSE"):
        sys.stderr.write(line)
    for lines in _captures:
        lines.append(line)
    if level == GGML_LOG_LEVEL_ERROR and line.strip():
        # the first line that says why ("error loading model: ...") is kept over the generic ones after it
        if not (line.strip().endswith("failed to load model") and "error loading model" in last_error):
            last_error = line.strip()
        log.debug(line.strip())


def init() -> None:
    global _ready
    if _ready:
        return
    C.llama_log_set(_on_log, None)
    C.llama_backend_init()
    _ready = True


@contextlib.contextmanager
def capture() -> Iterator[list[str]]:
    """Collect llama.cpp's log text written inside the block (the memory planner reads buffer sizes)."""
    init()
    lines: list[str] = []
    with _capture_lock:
        _captures.append(lines)
    try:
        yield lines
    finally:
        with _capture_lock:
            _captures.remove(lines)


def system_info() -> str:
    init()
    return C.llama_print_system_info().decode()


def supports_gpu_offload() -> bool:
    return bool(C.llama_supports_gpu_offload())


@lru_cache(maxsize=1)
def llama_thread() -> ThreadPoolExecutor:
    """The one thread on which an async app (the chat, a server) runs llama.cpp: loads and decodes.

    llama.cpp's CPU backend runs on OpenMP, and libgomp keeps a team of worker threads per calling thread.
    Once a second thread has decoded, the process holds more OpenMP threads than cores, libgomp stops
    spinning between graph nodes, and every later decode, on any thread, ran at 0.55-0.9x on 2 cores
    (README). One thread for every call keeps one team.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")


def favour_this_thread(nice: int = 10) -> int:
    """Lower the scheduling priority of every other thread of this process (the decode and llama.cpp's
    OpenMP workers; threads they start later inherit it), so the calling UI thread gets a core at once
    when a key arrives while a reply decodes on all of them. CFS only weighs runnable threads against each
    other, so the decode loses nothing while the UI sleeps. Returns how many threads were changed."""
    me, changed = threading.get_native_id(), 0
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        tid = int(task)
        if tid == me:
            continue
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
            changed += 1
    return changed
