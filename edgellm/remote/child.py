"""The child side of a split model: load it with its layers on RPC workers and stream one reply's tokens.

llama.cpp's RPC client aborts its process when a worker goes away; that process is this one. The parent
(supervisor.py) owns the reply's text: it runs the one emitter over the tokens this child sends.

Protocol: one JSON request on stdin. On the channel (the stdout this process started with; llama.cpp's own
writes to stdout go to stderr), one JSON object per line:
  {"ready": {"prompt": [ids], "n_ctx": n, "stops": [turn stops]}}   the model is loaded, the prompt tokenized
  {"t": id, "d": from_draft, "b": "hex of the token's bytes"}       one per token of the reply
  {"e": "a notice"}                                                  memory pressure
  {"end": "eog" | "length" | ...}                                    the reply ended here
  {"error": "one line"}                                              it could not go on (exit 1)
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from edgellm.errors import EdgeLLMError


def send(channel: IO[str], message: dict[str, Any]) -> None:
    channel.write(json.dumps(message, separators=(",", ":")) + "\n")
    channel.flush()


def serve(request: dict[str, Any], channel: IO[str]) -> None:
    from edgellm.runtime.engine import Engine, LoadOptions
    from edgellm.runtime.sampling import SamplingParams
    from edgellm.speculative.setup import make_speculator

    options = request["options"]
    engine = Engine(request["path"], LoadOptions(**{**options, "rpc": tuple(options["rpc"])}))
    stops: list[str] = []
    if request.get("messages") is not None:
        prompt = engine.chat_tokens(request["messages"])
        stops = engine.turn_stops()
    elif request.get("text") is not None:
        prompt = engine.tokenize(request["text"])
    else:
        prompt = [int(t) for t in request["tokens"]]
    send(channel, {"ready": {"prompt": prompt, "n_ctx": engine.n_ctx, "stops": stops}})
    speculator = make_speculator(engine, request.get("draft"))
    sampling = SamplingParams(**request["sampling"])
    # the parent's emitter decides stops and lengths; here only the model's own ends count
    for record in engine.generate(prompt, sampling, max_tokens=request["max_tokens"], speculator=speculator):
        if record.event:
            send(channel, {"e": record.event})
        if record.token is not None:
            send(channel, {"t": record.token, "d": record.from_draft,
                           "b": engine.weights.token_bytes(record.token).hex()})
        if record.finish_reason:
            send(channel, {"end": record.finish_reason})
            break
    if speculator is not None:
        speculator.close()
    engine.close()


def main() -> int:
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever C code prints to stdout must not mix with the channel
    try:
        serve(json.loads(sys.stdin.readline()), channel)
    except EdgeLLMError as e:
        send(channel, {"error": str(e)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
