"""The one emitter: chosen tokens -> records (text pieces, stop strings, finish reasons, stats, timing).

Every way of decoding feeds it: the step generators of one sequence (stream.py) and the scheduler's
batched sequences. It decides when a reply ends, after each token, by one rule.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from edgellm.decoding.records import Record, Stats
from edgellm.textstream import TextStream


class Vocabulary(Protocol):
    def token_bytes(self, token: int, special: bool = False) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...


@dataclass
class Drafting:
    """What a speculative step generator reports beside its tokens."""

    drafted_tokens: int = 0
    draft_steps: int = 0
    plain_t1: float = 0.0  # seconds one plain token costs (the speedup's estimate; from the cost curve)


class Emitter:
    def __init__(self, vocab: Vocabulary, prompt_tokens: int, n_ctx: int, stop: Sequence[str] = (),
                 max_tokens: int = 256, cancel: threading.Event | None = None, ignore_eog: bool = False) -> None:
        self.vocab, self.n_ctx, self.max_tokens = vocab, n_ctx, max_tokens
        self.cancel, self.ignore_eog = cancel, ignore_eog
        self.stats = Stats(prompt_tokens=prompt_tokens)
        self.text = TextStream(stop)
        self.drafting: Drafting | None = None
        self.finish_reason: str | None = None
        self._t0 = time.perf_counter()
        self._t_first: float | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def prefilled(self, n: int) -> None:
        """`n` of the prompt's tokens are decoded for it (the rest were in the KV cache already).

        prefill_s runs to the first token: a draft model's own prefill and the first pick count there."""
        self.stats.prefilled_tokens = n

    def emit(self, token: int, from_draft: bool = False) -> Record:
        """The record for the next token of the reply; its finish_reason is set when the reply ends here."""
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now
            self.stats.prefill_s = now - self._t0
        s = self.stats
        s.decode_s = now - self._t_first
        if not self.ignore_eog and self.vocab.is_eog(token):
            return self._last(self.text.flush(), None, False, "eog")
        s.generated_tokens += 1
        s.accepted_tokens += from_draft
        piece = self.text.push(self.vocab.token_bytes(token))
        finish = self._finish_after()
        if finish:
            return self._last(piece + self.text.flush(), token, from_draft, finish)
        return Record(piece, token, self._snapshot(), from_draft)

    def _finish_after(self) -> str | None:
        """Why the reply ends after the token just emitted, or None. That token takes position
        prompt + generated - 1; the context is full when that is past its end."""
        s = self.stats
        if self.text.stopped:
            return self.text.reason
        if s.generated_tokens >= self.max_tokens:
            return "length"
        if self.cancelled:
            return "cancelled"
        if s.prompt_tokens + s.generated_tokens - 1 >= self.n_ctx:
            return "context"
        return None

    def end(self, reason: str, event: str | None = None) -> Record:
        """End the reply without a token (cancelled before its first, a failed decode)."""
        return self._last(self.text.flush(), None, False, reason, event)

    def event(self, what: str) -> Record:
        return Record("", None, self._snapshot(), event=what)

    def _last(self, text: str, token: int | None, from_draft: bool, reason: str, event: str | None = None) -> Record:
        self.finish_reason = reason
        return Record(text, token, self._snapshot(), from_draft, reason, event)

    def _snapshot(self) -> Stats:
        d = self.drafting
        if d is not None:
            s = self.stats
            s.drafted_tokens, s.draft_steps = d.drafted_tokens, d.draft_steps
            s.plain_estimate_s = max(s.generated_tokens - 1, 0) * d.plain_t1
        return copy.copy(self.stats)
