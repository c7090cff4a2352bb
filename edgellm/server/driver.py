"""The server's llama thread: every llama.cpp call of the process runs here, in one loop.

HTTP handlers (the event loop) hand it jobs and await their records; it loads each model through the
process's model manager, tokenizes the job's messages with the model's own template, submits it to that
model's scheduler, steps every scheduler that has work, and posts each job's new records back to the
event loop. It sleeps while no request is active. A cancel (a client gone, a shutdown) is an Event the
scheduler reads between steps, so a job is freed wherever it is: queued, prefilling or decoding. A failed
step ends only the requests of that model's step (the scheduler's rule); the driver goes on.

Shape: mlx-lm's server.py (a request queue, one generation thread, a context per request).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.memory.manager import Loaded, process_manager
from edgellm.memory.pressure import default_watch
from edgellm.memory.scheduler import Request, Scheduler
from edgellm.model_defaults import resolve_defaults
from edgellm.options import Planned, planned_load, rpc_endpoints
from edgellm.remote.split import SplitScheduler
from edgellm.runtime.backend import llama_thread
from edgellm.runtime.engine import Engine
from edgellm.runtime.grammar import check_grammar
from edgellm.runtime.model import Model
from edgellm.server.catalog import Entry

log = logging.getLogger("edgellm.serve")


class ServeError(EdgeLLMError):
    """An error a request gets as an HTTP status and a message."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


@dataclass(frozen=True)
class Settings:
    """`edgellm serve`'s load settings: each model is planned as `run` plans it, with `parallel` slots."""

    parallel: int | None = None  # None: 4 where memory allows (the planner picks fewer when not)
    ctx: int | None = None  # per slot
    threads: int | None = None
    gpu_layers: int | None = None
    kv_type: str | None = None
    draft: str = "auto"
    keep_alive_s: float = 300.0
    rpc: str | None = None  # llama.cpp RPC workers, HOST:PORT[,HOST:PORT] (None: $EDGELLM_RPC)
    ram: str | None = None  # host memory to plan for (None: MemAvailable less a margin)


@dataclass(frozen=True)
class Started:
    """Posted first: the job is in a slot's queue."""

    prompt_tokens: int
    load_s: float  # the model's load, when this job caused it


DONE = object()  # posted last


@dataclass(eq=False)
class Job:
    entry: Entry
    messages: list[dict[str, Any]] | None  # a chat, rendered through the model's template
    prompt: str | None  # or a raw completion
    sampling: dict[str, Any]  # settings the request gave (None: the model's default); "grammar": GBNF text
    max_tokens: int | None
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    n_ctx: int | None = None  # Ollama's num_ctx: a load with this context per slot
    keep_alive_s: float | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI-shaped function definitions the template is given
    cancel: threading.Event = field(default_factory=threading.Event)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    seen: int = 0  # records posted so far (the llama thread's)

    def post(self, item: object) -> None:
        """From the llama thread: hand an item to the awaiting handler."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits it any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class Served:
    """A model loaded for serving: the manager's handle (held while it has jobs) and its scheduler; a model
    split over RPC workers has no handle here: its scheduler's child process holds it (remote/split.py)."""

    key: tuple[Path, int | None]
    name: str
    planned: Planned  # the plan it was loaded with: acquiring it again gives the same engine
    loaded: Loaded | None
    scheduler: Scheduler | SplitScheduler
    held: bool = True
    jobs: list[tuple[Job, Request]] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    keep_alive_s: float = 300.0

    @property
    def split(self) -> bool:
        return isinstance(self.scheduler, SplitScheduler)

    @property
    def engine(self) -> Engine | Model:
        """What its requests are tokenized with (a split model's vocabulary, loaded here without weights)."""
        if isinstance(self.scheduler, SplitScheduler):
            return self.scheduler.vocab
        assert self.loaded is not None
        return self.loaded.engine

    @property
    def evicted(self) -> bool:
        """The manager unloaded it meanwhile, or its split model's process cannot go on."""
        if isinstance(self.scheduler, SplitScheduler):
            return self.scheduler.broken is not None
        return self.loaded is None or self.loaded.engine.ctx is None

    @property
    def expires_at(self) -> float:
        """Wall-clock time of its unload when idle (Ollama's /api/ps)."""
        return time.time() + max(0.0, self.keep_alive_s - (time.monotonic() - self.last_used)) if not self.jobs \
            else time.time() + self.keep_alive_s


class Driver:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manager = process_manager()
        # the driver owns keep-alive (per model, Ollama's per request); the manager's own would unload a model
        # inside acquire() while the driver still holds its scheduler
        self.manager.keep_alive_s = math.inf
        self._inbox: queue.SimpleQueue[Job | Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._closed = False  # the loop has ended: no job is taken any more
        self._submit_lock = threading.Lock()
        self._served: dict[tuple[Path, int | None], Served] = {}
        self._lock = threading.Lock()  # guards `loaded_view` (read by HTTP handlers)
        self.loaded_view: list[dict[str, Any]] = []
        self._outbox: list[tuple[Job, object]] = []  # records for the event loop, handed over once per step
        self.swap_dir = Path(tempfile.mkdtemp(prefix="edgellm-serve-"))
        self.workers_lost: set[str] = set()  # RPC workers that went away: later loads plan without them
        self._future = None

    # -- from the event loop ------------------------------------------------------------------------
    def start(self) -> None:
        self._future = llama_thread().submit(self._run)
        self._future.add_done_callback(lambda f: f.exception() and log.error("the llama thread's loop ended: %r",
                                                                             f.exception()))

    def submit(self, job: Job) -> None:
        with self._submit_lock:
            if self._closed:
                raise ServeError("the server is stopping", 503)
            self._inbox.put(job)
        self._wake.set()

    def cancel(self, job: Job) -> None:
        job.cancel.set()
        self._wake.set()

    def stop_soon(self) -> None:
        """A signal handler's part: a flag only (an Event's lock is not reentrant, and the signal may land
        while this thread holds it); the loop sees it within a second, cancels every job, ends once idle."""
        self._stopping = True

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job (their streams end with "cancelled"), unload the models, remove swap files."""
        self._stopping = True
        self._wake.set()
        try:
            if self._future is not None:
                self._future.result(timeout)
        finally:
            shutil.rmtree(self.swap_dir, ignore_errors=True)

    def loaded(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.loaded_view)

    # -- on the llama thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                self._take_inbox()
                if self._stopping:
                    self._cancel_all()
                busy = local = False
                for served in list(self._served.values()):
                    if served.scheduler.active or served.scheduler.waiting:
                        busy = True
                        local = local or not served.split
                        self._step(served)
                self._flush()
                if self._stopping and not busy:
                    return
                self._idle()
                self._publish()
                if not local:  # idle, or only split models' children at work: until one of them sends
                    self._wake.wait(timeout=0.25 if busy else 1.0)
                    self._wake.clear()
        finally:
            with self._submit_lock:
                self._closed = True  # submit() answers 503 from now on
            for served in list(self._served.values()):
                for job, _ in served.jobs:
                    job.post(ServeError("the server is stopping", 503))
                served.jobs.clear()
                self._unload(served)
            while True:
                try:
                    self._inbox.get_nowait().post(ServeError("the server is stopping", 503))
                except queue.Empty:
                    break
            self.manager.close()
            self._publish()
            shutil.rmtree(self.swap_dir, ignore_errors=True)

    def _take_inbox(self) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if job.cancel.is_set() or self._stopping:
                job.post(ServeError("cancelled: the server is stopping" if self._stopping else "cancelled", 503))
                continue
            try:
                self._start(job)
            except ServeError as e:
                job.post(e)
            except (EdgeLLMError, UnicodeError) as e:  # a template's error, text that is not valid Unicode
                job.post(ServeError(str(e), 400))
            except Exception as e:  # never the loop's end: this job fails, the others go on
                log.exception("starting a job failed")
                job.post(ServeError(f"internal error: {type(e).__name__}", 500))

    def _start(self, job: Job) -> None:
        if job.sampling.get("grammar"):  # made from the schema on the HTTP side; llama.cpp parses it here, once
            check_grammar(job.sampling["grammar"])
        t0 = time.perf_counter()
        served = self._served_for(job)
        load_s = time.perf_counter() - t0
        engine, scheduler = served.engine, served.scheduler
        if job.messages is not None:
            tokens = engine.chat_tokens(job.messages, job.tools)  # the template's errors: one EdgeLLMError line (400)
            stop = [*job.stop, *engine.turn_stops()]
        else:
            tokens = engine.tokenize(job.prompt or "")
            stop = list(job.stop)
        if not tokens:
            raise ServeError("the prompt is empty")
        if len(tokens) >= scheduler.cells:
            raise ServeError(f"the prompt is {len(tokens)} tokens but the context holds {scheduler.cells} "
                             f"per request; send a shorter prompt or load the model with a larger context")
        if not scheduler.accepting:
            raise ServeError("memory is low: no new sessions until some frees", 503, retry_after=5)
        defaults = resolve_defaults(engine.info, {k: v for k, v in job.sampling.items() if k in SAMPLING_FLAGS},
                                    seed=job.sampling.get("seed"))
        extra = {k: v for k, v in job.sampling.items() if k in ("frequency_penalty", "presence_penalty", "grammar")
                 and v is not None}
        sampling = replace(defaults.sampling, **extra)
        max_tokens = min(job.max_tokens or scheduler.cells, scheduler.cells)
        request = scheduler.submit(tokens, sampling, max_tokens, stop=stop, cancel=job.cancel,
                                   ignore_eog=bool(job.sampling.get("ignore_eos")))
        served.jobs.append((job, request))
        served.last_used = time.monotonic()
        if job.keep_alive_s is not None:
            served.keep_alive_s = job.keep_alive_s
        job.post(Started(len(tokens), load_s))

    def _served_for(self, job: Job) -> Served:
        key = (job.entry.path, job.n_ctx or self.settings.ctx)
        served = self._served.get(key)
        if served is not None and served.evicted:
            self._unload(served)
            served = None
        if served is not None:
            if not served.held and not served.split:
                loaded = self._acquire(served.planned, job.entry)  # the same load: usually the same engine back
                served.held = True
                if loaded is served.loaded:
                    return served
                self._forget(served)  # the manager loaded it anew: a new scheduler on the new engine
                served.scheduler.close()
                return self._serve(key, job.entry, served.planned, loaded)
            return served
        planned = self._plan(key, job.entry)
        if planned.split:
            return self._serve_split(key, job.entry, planned)
        return self._serve(key, job.entry, planned, self._acquire(planned, job.entry))

    def _serve_split(self, key: tuple[Path, int | None], entry: Entry, planned: Planned) -> Served:
        """A model over RPC workers, in a child process that a lost worker may end: the requests go on."""
        try:
            scheduler = SplitScheduler(planned.path, planned.options, planned.replan, notify=self._wake.set)
        except EdgeLLMError as e:
            raise ServeError(f"{entry.name} cannot be loaded now: {e}", 503, retry_after=30) from e
        served = Served(key, entry.name, planned, None, scheduler, held=False, keep_alive_s=self.settings.keep_alive_s)
        self._served[key] = served
        return served

    def _serve(self, key: tuple[Path, int | None], entry: Entry, planned: Planned, loaded: Loaded) -> Served:
        try:
            scheduler = Scheduler(loaded.engine, self.swap_dir, watch=default_watch(), policy="auto")
        except Exception:
            self.manager.release(loaded)
            raise
        served = Served(key, entry.name, planned, loaded, scheduler, keep_alive_s=self.settings.keep_alive_s)
        self._served[key] = served
        self._drop_evicted()
        return served

    def _plan(self, key: tuple[Path, int | None], entry: Entry) -> Planned:
        """The settings' workers, less those lost once (a later load plans without them)."""
        s = self.settings
        rpc = ",".join(w for w in rpc_endpoints(argparse.Namespace(rpc=s.rpc)) if w not in self.workers_lost)
        flags = argparse.Namespace(ctx=key[1], threads=s.threads, gpu_layers=s.gpu_layers, batch=512,
                                   kv_type=s.kv_type, mmap=False, draft=s.draft, rpc=rpc, ram=s.ram)
        try:
            return planned_load(flags, entry.info, parallel=s.parallel or 4)
        except EdgeLLMError as e:
            raise ServeError(f"{entry.name} does not fit: {e}", 503, retry_after=30) from e

    def _acquire(self, planned: Planned, entry: Entry) -> Loaded:
        # no waiting here: the models in use are served by this very thread
        try:
            return self.manager.acquire(planned.path, planned.request, timeout=0, plan=planned.plan, **planned.extra)
        except EdgeLLMError as e:
            raise ServeError(f"{entry.name} cannot be loaded now: {e}", 503, retry_after=30) from e

    def _drop_evicted(self) -> None:
        for served in [s for s in self._served.values() if s.evicted and not s.split]:
            self._forget(served)
            served.scheduler.close()

    def _forget(self, served: Served) -> None:
        self._served.pop(served.key, None)

    def _step(self, served: Served) -> None:
        try:
            if isinstance(served.scheduler, SplitScheduler):
                served.scheduler.step(wait_s=0)  # its child's lines wake this loop (`notify`)
            else:
                served.scheduler.step()
        except Exception as e:  # not a request's fault: end this model's requests, keep serving
            log.exception("a step of %s failed", served.name)
            for job, _ in served.jobs:
                job.post(ServeError(f"generation failed: {e}", 500))
            served.jobs.clear()
            self._unload(served)
            return
        if isinstance(served.scheduler, SplitScheduler):
            while served.scheduler.events:  # a worker gone: the server's log says so too
                log.warning("%s: %s", served.name, served.scheduler.events.popleft())
            self.workers_lost.update(served.scheduler.lost)
        for job, request in list(served.jobs):
            new = request.records[job.seen:]
            if new:
                self._outbox.append((job, list(new)))
                job.seen += len(new)
            if request.done:
                self._outbox.append((job, DONE))
                served.jobs.remove((job, request))
                served.last_used = time.monotonic()

    def _flush(self) -> None:
        """Every job's new records in one hand-over per event loop and step: a wake-up of the loop takes a
        core from the decode on 2 cores, so it wakes once per step, not once per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, object]]] = {}
        for job, item in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        self._outbox.clear()
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody awaits these any more
                loop.call_soon_threadsafe(_deliver, items)

    def _idle(self) -> None:
        """Release models with no jobs to the manager (it may evict them for another), and unload those whose
        keep-alive ran out."""
        now = time.monotonic()
        for served in list(self._served.values()):
            if served.jobs or served.scheduler.waiting:
                continue
            if served.held:
                self.manager.release(served.loaded)
                served.held = False
            if now - served.last_used >= served.keep_alive_s:
                self._unload(served)

    def _unload(self, served: Served) -> None:
        self._forget(served)
        if served.split:
            served.scheduler.close()
            return
        assert served.loaded is not None
        if served.engine.ctx is not None:
            served.scheduler.close()
        if served.held:
            self.manager.release(served.loaded)
            served.held = False
        self.manager.unload(served.loaded)

    def _cancel_all(self) -> None:
        for served in self._served.values():
            for job, _ in served.jobs:
                job.cancel.set()

    def _publish(self) -> None:
        view = [{"name": s.name, "path": s.key[0], "plan": s.planned.plan, "expires_at": s.expires_at,
                 "n_ctx": s.scheduler.cells, "slots": len(s.scheduler.slots), "busy": len(s.jobs)}
                for s in self._served.values()]
        with self._lock:
            self.loaded_view = view


def _deliver(items: list[tuple[Job, object]]) -> None:
    for job, item in items:
        job.queue.put_nowait(item)


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")

