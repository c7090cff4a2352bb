"""The child side of a split model: a scheduler over it, driven through stdin, as long as the model is loaded.

`edgellm run`, `chat` and `serve` with layers on RPC workers load the model here. llama.cpp's RPC client
aborts this process when a worker goes away; the parent (split.py) owns every request's text and starts
another child.

Protocol: the first line on stdin is {"path": ..., "options": {LoadOptions}}; then one command a line:
  {"submit": id, "tokens": [ids], "sampling": {SamplingParams}, "max_tokens": n, "ignore_eog": bool,
   "resume": n}   (the last n tokens are the reply's own so far: its grammar and penalties take them)
  {"cancel": id}
stdin's end closes the model and ends the process. On the channel (the stdout it started with; llama.cpp's
own writes to stdout go to stderr), one JSON object a line:
  {"ready": {"n_ctx": n, "cells": n, "slots": n}}   the model is loaded
  {"id": id, "t": token, "d": from_draft}          the next token of a request
  {"id": id, "e": "a notice"}                      memory pressure
  {"id": id, "end": reason, "why": "..."}          the request ended here (why: a refused request's line)
  {"s": 1}                                         a step that made none of the above (the parent's watchdog)
  {"error": "one line"}                            it could not load (exit 1)
Stop strings are the parent's: here a request ends on the model's own end, its length or a cancel.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sys
import threading
from typing import IO, Any

from edgellm.errors import EdgeLLMError


def _read(commands: queue.SimpleQueue) -> None:
    for line in sys.stdin:
        commands.put(json.loads(line))
    commands.put(None)


def serve(first: dict[str, Any], commands: queue.SimpleQueue, channel: IO[str]) -> None:
    from edgellm.memory.scheduler import Request, Scheduler
    from edgellm.runtime.engine import Engine, LoadOptions
    from edgellm.runtime.sampling import SamplingParams

    options = first["options"]
    engine = Engine(first["path"], LoadOptions(**{**options, "rpc": tuple(options["rpc"])}))
    scheduler = Scheduler(engine, policy="auto")
    out: list[str] = []

    def send(message: dict[str, Any]) -> None:
        out.append(json.dumps(message, separators=(",", ":")))

    def flush() -> None:
        if out:
            channel.write("\n".join(out) + "\n")
            channel.flush()
            out.clear()

    send({"ready": {"n_ctx": engine.n_ctx, "cells": scheduler.cells, "slots": len(scheduler.slots)}})
    flush()
    tracked: dict[int, Request] = {}
    seen: dict[int, int] = {}
    while True:
        busy = bool(scheduler.active or scheduler.waiting)
        try:
            command = commands.get(block=not busy)
            while True:
                if command is None:  # the parent closed stdin: the model goes
                    scheduler.close()
                    engine.close()
                    return
                if "submit" in command:
                    rid = int(command["submit"])
                    try:
                        tracked[rid] = scheduler.submit(
                            command["tokens"], SamplingParams(**command["sampling"]), int(command["max_tokens"]),
                            ignore_eog=bool(command["ignore_eog"]), cancel=threading.Event(),
                            resume=int(command.get("resume", 0)))
                        seen[rid] = 0
                    except EdgeLLMError as e:
                        send({"id": rid, "end": "error", "why": str(e)})
                elif "cancel" in command and int(command["cancel"]) in tracked:
                    cancel = tracked[int(command["cancel"])].cancel
                    assert cancel is not None
                    cancel.set()
                command = commands.get_nowait()
        except queue.Empty:
            pass
        stepped = bool(scheduler.active or scheduler.waiting)
        if stepped:
            scheduler.step()
        for rid, request in list(tracked.items()):
            for record in request.records[seen[rid]:]:
                if record.event:
                    send({"id": rid, "e": record.event})
                if record.token is not None:
                    send({"id": rid, "t": record.token, "d": record.from_draft})
                if record.finish_reason:
                    send({"id": rid, "end": record.finish_reason})
            seen[rid] = len(request.records)
            if request.done:
                del tracked[rid], seen[rid]
        if stepped and not out:
            send({"s": 1})
        flush()


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is the parent's to handle
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever C code prints to stdout must not mix with the channel
    commands: queue.SimpleQueue = queue.SimpleQueue()
    first = json.loads(sys.stdin.readline())
    threading.Thread(target=_read, args=(commands,), daemon=True).start()
    try:
        serve(first, commands, channel)
    except Exception as e:  # the parent ends the running requests with this line
        why = str(e) if isinstance(e, EdgeLLMError) else f"{type(e).__name__}: {e}"
        channel.write(json.dumps({"error": why}) + "\n")
        channel.flush()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
