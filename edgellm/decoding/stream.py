"""One sequence's reply: prefill, a step generator, the emitter; records out (Engine.generate)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from edgellm.decoding.emitter import Drafting, Emitter
from edgellm.decoding.records import Record
from edgellm.decoding.steps import Step, plain_steps
from edgellm.runtime.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from edgellm.runtime.engine import Engine


class Speculating(Protocol):
    """What a speculator (speculative.setup.Speculator) offers the loop."""

    def steps(self, engine: Engine, sampler: Sampler, prompt: Sequence[int], drafting: Drafting,
              max_tokens: int) -> Iterator[Step]: ...

    def relieve(self) -> str | None:
        """Under memory pressure, give something up between two tokens and say what (None: nothing)."""


def stream_generate(engine: Engine, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int = 256,
                    stop: Sequence[str] = (), cancel: threading.Event | None = None, ignore_eog: bool = False,
                    speculator: Speculating | None = None) -> Iterator[Record]:
    """Stream the continuation of `prompt` (token ids) on the engine's sequence 0, one record per token."""
    prompt = list(prompt)
    emitter = Emitter(engine, len(prompt), engine.n_ctx, stop, max_tokens, cancel, ignore_eog)
    sampler = Sampler(sampling, engine.n_vocab, prompt, engine.vocab)  # a grammar llama.cpp refuses: before any decode
    emitter.prefilled(engine.prefill(prompt))
    if speculator is None:
        steps = plain_steps(engine, sampler)
    else:
        emitter.drafting = Drafting()
        steps = speculator.steps(engine, sampler, prompt, emitter.drafting, max_tokens)
    try:
        for token, from_draft in steps:
            record = emitter.emit(token, from_draft)
            yield record
            if record.finish_reason:
                return
            note = speculator.relieve() if speculator is not None else None
            if note:
                yield emitter.event(f"memory low: {note}")
    finally:
        steps.close()
        sampler.close()
