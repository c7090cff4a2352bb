"""The UI's way to the llama thread: hand it a job, await the result, never for ever.

Every llama.cpp call of the app (a load, a plan's dry run, a reset, a close) runs on the one llama thread
(runtime.backend.llama_thread). Jobs run in the order they were handed over, so a close handed over after
a reply started runs after that reply, and a job that took an engine while it was the session's runs
before the close that ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from edgellm.errors import EdgeLLMError
from edgellm.runtime.backend import llama_thread

T = TypeVar("T")

LLAMA_WAIT_S = 300.0  # a job that has not finished by then is reported, not awaited for ever


async def on_llama_thread(fn: Callable[..., T], *args: Any, what: str, timeout: float = LLAMA_WAIT_S,
                          dispose: Callable[[T], object] | None = None) -> T:
    """`fn(*args)` on the llama thread. A job is never cut short (llama.cpp cannot be): when its caller
    stops waiting (the timeout, a cancelled worker) it still runs, and `dispose` gets what it made, on the
    llama thread. The timeout raises EdgeLLMError, saying `what` did not finish."""
    job = llama_thread().submit(fn, *args)
    result = asyncio.wrap_future(job)
    result.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, if no one awaits it any more
    try:
        return await asyncio.wait_for(asyncio.shield(result), timeout)
    except (TimeoutError, asyncio.CancelledError) as e:
        if dispose is not None:
            job.add_done_callback(functools.partial(_dispose_when_done, dispose))
        if isinstance(e, TimeoutError):
            raise EdgeLLMError(f"{what} did not finish in {timeout:g} s (the llama thread is busy or stuck)") from None
        raise


def _dispose_when_done(dispose: Callable[[Any], object], job: Future) -> None:
    if job.cancelled() or job.exception() is not None:
        return
    with contextlib.suppress(RuntimeError):  # the interpreter is shutting down: the process frees it all
        llama_thread().submit(dispose, job.result())
