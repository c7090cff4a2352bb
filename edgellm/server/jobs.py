"""What both APIs do with a job: hand it to the driver, await its start, then its records.

Finish reasons: ours are "eog", "stop" (a stop string), "repetition", "length", "context", "cancelled" and
"error"; OpenAI's and Ollama's clients know "stop" and "length". `public_finish` maps them, and the
extension field `x_edgellm` carries ours with the drafted and accepted token counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from edgellm.decoding.records import Record, Stats
from edgellm.server.driver import DONE, Driver, Job, ServeError, Started

FINISH = {"eog": "stop", "stop": "stop", "repetition": "stop", "cancelled": "stop", "length": "length",
          "context": "length", "error": "stop"}


def public_finish(reason: str | None) -> str:
    return FINISH.get(reason or "", "stop")


@dataclass
class Outcome:
    """A whole reply, for the answers that are not streamed."""

    text: str = ""
    records: list[Record] = field(default_factory=list)

    @property
    def last(self) -> Record | None:
        return self.records[-1] if self.records else None

    @property
    def stats(self) -> Stats:
        return self.last.stats if self.last else Stats()

    @property
    def finish_reason(self) -> str | None:
        return self.last.finish_reason if self.last else None


async def start(driver: Driver, job: Job) -> Started:
    """Submit the job and wait until it has a slot's queue, or its error (raised as ServeError)."""
    driver.submit(job)
    try:
        item = await job.queue.get()
    except asyncio.CancelledError:
        driver.cancel(job)
        raise
    if isinstance(item, ServeError):
        raise item
    assert isinstance(item, Started)
    return item


async def records(driver: Driver, job: Job) -> AsyncIterator[Record]:
    """The job's records as the driver makes them; a consumer that stops early cancels the job."""
    try:
        while True:
            item = await job.queue.get()
            if item is DONE:
                return
            if isinstance(item, ServeError):
                raise item
            for record in item:  # type: ignore[union-attr]
                yield record
    finally:
        driver.cancel(job)  # a no-op when it is done; frees the slot when the client went away


async def collect(driver: Driver, job: Job, request: Request | None = None) -> Outcome:
    """The whole reply; a client that disconnects meanwhile cancels it (uvicorn does not cancel the handler)."""
    watcher = asyncio.create_task(cancel_on_disconnect(driver, job, request)) if request is not None else None
    try:
        out = Outcome()
        parts = []
        async for record in records(driver, job):
            out.records.append(record)
            parts.append(record.text)
        out.text = "".join(parts)
        return out
    finally:
        if watcher is not None:
            watcher.cancel()


async def cancel_on_disconnect(driver: Driver, job: Job, request: Request) -> None:
    """The body is read: the next message the server gets on this request is the client leaving."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    driver.cancel(job)


class JobStream(StreamingResponse):
    """A streamed reply that cancels its job however the response ends: a client gone before the first
    chunk (the stream's generator never ran) included."""

    def __init__(self, content: AsyncIterator[str], driver: Driver, job: Job, media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self.driver, self.job = driver, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.driver.cancel(self.job)


def extension(stats: Stats, finish_reason: str | None) -> dict:
    """Our own figures beside OpenAI's and Ollama's fields."""
    return {"finish_reason": finish_reason, "drafted_tokens": stats.drafted_tokens,
            "accepted_tokens": stats.accepted_tokens, "prefill_s": round(stats.prefill_s, 4),
            "decode_tps": round(stats.decode_tps, 2)}
