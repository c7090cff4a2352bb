"""Several sessions on one model: each its own KV sequence in one context, every step one llama_decode.

Continuous batching (iteration-level scheduling): a step carries the next token of every decoding
sequence and, in the room left under n_batch, a chunk of each new request's prompt, so a prefill joins
the running steps instead of stalling them. A request goes to the slot that already holds its session
(or the longest common prefix); when every slot is taken, the least recently used idle slot is swapped
to disk with llama_state_seq_save_file and restored when its session comes back, so a conversation
switched out and back does not prefill again (kvfile.py checks that a file fits the context).

Under memory pressure (a MemoryWatch: MemAvailable below its margin) it gives way in order, one stage per
low reading: the reliefs its owner registered (a draft model dropped), then every idle sequence swapped
to disk, then new sessions refused until memory is back; each stage is an event record in the stream of
every running request. No running session is stopped and no text is lost.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgellm.decoding.emitter import Drafting, Emitter
from edgellm.decoding.records import Record, Stats
from edgellm.errors import CacheTrimError, EdgeLLMError
from edgellm.memory.pressure import MemoryWatch
from edgellm.runtime import kvfile
from edgellm.runtime.context import KVSequence, TokenBatch, common_prefix
from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import Sampler, SamplingParams
from edgellm.speculative.batched import Lookahead
from edgellm.speculative.costs import load_or_prior
from edgellm.speculative.policy import Policy


@dataclass
class Slot:
    """One KV sequence of the context, and the session that last used it."""

    kv: KVSequence
    session: str | None = None
    busy: bool = False
    last_used: float = 0.0

    @property
    def tokens(self) -> list[int]:
        return self.kv.tokens


@dataclass
class Request:
    prompt: list[int]
    sampling: SamplingParams
    max_tokens: int
    emitter: Emitter  # text, stops, finish, stats and timing: the same as a single sequence's
    session: str | None = None  # requests of one conversation share a slot (and its KV prefix)
    cancel: threading.Event | None = None
    resume: int = 0  # the prompt's last tokens that are this reply's own so far (a split model's failover)
    records: list[Record] = field(default_factory=list)  # appended as they are made
    slot: Slot | None = None
    done: bool = False
    _todo: list[int] = field(default_factory=list)  # prompt tokens not yet in the KV cache
    _next: int | None = None  # the last sampled token, decoded by the next step
    _sampler: Sampler | None = None
    _spec: Lookahead | None = None  # per-sequence speculation (Scheduler.policy)

    @property
    def stats(self) -> Stats:
        """The statistics as the last record left them."""
        return self.records[-1].stats if self.records else self.emitter.stats

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.records)

    @property
    def finish_reason(self) -> str | None:
        return self.records[-1].finish_reason if self.records else None


def check_prompt(prompt: Sequence[int], cells: int, n_vocab: int) -> None:
    """A request's prompt fits a slot of `cells` positions and names only tokens of the vocabulary."""
    if not prompt:
        raise EdgeLLMError("empty prompt")
    if len(prompt) >= cells:
        raise EdgeLLMError(f"the prompt is {len(prompt)} tokens but a slot holds {cells}; "
                           "use a larger --ctx or fewer slots")
    bad = next((t for t in prompt if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise EdgeLLMError(f"token {bad} is outside the model's vocabulary of {n_vocab}")


class Scheduler:
    """Batches the requests of many sessions on one engine loaded with n_seq_max slots.

    Drive it from one thread (backend.llama_thread in an app): `submit`, then `step` until idle,
    or `generate` for one request's records while others run beside it.
    """

    def __init__(self, engine: Engine, swap_dir: Path | None = None, watch: MemoryWatch | None = None,
                 policy: Policy | Literal["auto"] | None = "auto") -> None:
        """`policy`: speculate per sequence with lookup drafts where the batch's cost curve says it pays
        (speculative/batched.py). "auto": on the model's cost curve (its cached one, else a prior from its
        size) when the context has logits rows for drafts (the plan's, LoadOptions.n_outputs); None: off."""
        if engine.n_outputs < engine.options.n_seq_max:
            raise EdgeLLMError("the scheduler needs a context made for one logits row per slot")
        if policy == "auto":  # draft rows planned, and a cache that can drop rejected drafts
            wide = engine.n_outputs > engine.options.n_seq_max
            policy = Policy(load_or_prior(engine)) if wide and engine.weights.can_drop_tail else None
        self.policy = policy
        self.engine = engine
        self.slots = [Slot(engine.sequence(i)) for i in range(engine.options.n_seq_max)]
        self.cells = engine.n_ctx // len(self.slots)  # positions per slot (llama.cpp splits n_ctx)
        self.swap_dir = swap_dir
        self.swapped: dict[str, Path] = {}  # session -> its saved KV file
        self.waiting: list[Request] = []
        self.active: list[Request] = []
        self._batch = TokenBatch(engine.n_batch)
        self.steps = 0
        self.swaps_out = self.swaps_in = 0
        self.watch = watch
        # under pressure, first: callables that free memory and say what they did (None: nothing left)
        self.reliefs: list[Callable[[], str | None]] = []
        self.accepting = True
        self.events: deque[str] = deque(maxlen=256)

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], sampling: SamplingParams | None = None, max_tokens: int = 256,
               stop: Sequence[str] = (), ignore_eog: bool = False, session: str | None = None,
               cancel: threading.Event | None = None, resume: int = 0) -> Request:
        """`resume`: the last `resume` tokens of `prompt` are the reply's own so far (it goes on in another
        process): its grammar and penalty window take them as generated, not as prompt."""
        if not self.accepting:
            raise EdgeLLMError("memory is low: no new sessions until some frees (the running ones go on)")
        check_prompt(prompt, self.cells, self.engine.n_vocab)
        emitter = Emitter(self.engine, len(prompt), self.cells, stop, max_tokens, cancel, ignore_eog)
        request = Request(list(prompt), sampling or SamplingParams(), max_tokens, emitter, session, cancel,
                          resume=max(0, min(resume, len(prompt) - 1)))
        self.waiting.append(request)
        return request

    def generate(self, prompt: Sequence[int], **kwargs) -> Iterator[Record]:
        """Submit one request and step until it is done, yielding its records (others advance too)."""
        request = self.submit(prompt, **kwargs)
        seen = 0
        while not request.done:
            self.step()
            yield from request.records[seen:]
            seen = len(request.records)
        yield from request.records[seen:]

    def run(self) -> None:
        while self.step():
            pass

    # -- slots ------------------------------------------------------------------------------------
    def _admit(self) -> None:
        for request in [r for r in self.waiting if r.emitter.cancelled]:  # cancelled while queued
            self.waiting.remove(request)
            self._end(request, "cancelled")
        while self.waiting:
            request = self.waiting[0]
            slot = self._slot_for(request)
            if slot is None:
                return  # every slot is decoding: wait for one to finish
            self.waiting.pop(0)
            self._start(request, slot)

    def _slot_for(self, request: Request) -> Slot | None:
        """The slot that holds this session, else the one sharing the longest prefix, else the least
        recently used (another session's KV is swapped to disk first)."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        if request.session is not None:
            for s in free:
                if s.session == request.session:
                    return s
        shared = [s for s in free if s.session is None and common_prefix(s.tokens, request.prompt)]
        if shared and request.session not in self.swapped:
            return max(shared, key=lambda s: common_prefix(s.tokens, request.prompt))
        slot = min(free, key=lambda s: (bool(s.tokens), s.last_used))
        self._swap_out(slot)
        if request.session is not None and request.session in self.swapped:
            self._swap_in(request.session, slot)
        return slot

    def _swap_out(self, slot: Slot) -> None:
        """Save the slot's KV sequence to disk (when it belongs to a session) and empty it."""
        if slot.tokens and slot.session is not None and self.swap_dir is not None:
            path = self.swap_dir / f"{kvfile.safe_name(slot.session)}.kv"
            kvfile.save(self.engine, slot.kv.seq_id, slot.tokens, path)
            self.swapped[slot.session] = path
            self.swaps_out += 1
        slot.kv.clear()
        slot.session = None

    def _swap_in(self, session: str, slot: Slot) -> None:
        path = self.swapped.pop(session)
        try:
            slot.kv.tokens = kvfile.load(self.engine, slot.kv.seq_id, path, self.cells)
            slot.session = session
            self.swaps_in += 1
        except EdgeLLMError:
            slot.kv.clear()  # the session's prompt is prefilled again
        finally:
            kvfile.remove(path)

    def _start(self, request: Request, slot: Slot) -> None:
        try:
            own = len(request.prompt) - request.resume
            sampler = Sampler(request.sampling, self.engine.n_vocab, request.prompt[:own], self.engine.vocab)
            for token in request.prompt[own:]:
                sampler.accept(token)
        except EdgeLLMError as e:  # a grammar llama.cpp refuses: this request ends, the others go on
            self._end(request, "error", str(e))
            return
        keep = min(common_prefix(slot.tokens, request.prompt), len(request.prompt) - 1)
        try:
            slot.kv.trim(keep)
        except CacheTrimError:
            keep = 0
        slot.busy, slot.session, slot.last_used = True, request.session, time.monotonic()
        request.slot = slot
        request._todo = request.prompt[keep:]
        request.emitter.stats.prefilled_tokens = len(request._todo)
        request._sampler = sampler
        if self.policy is not None:
            request.emitter.drafting = Drafting(plain_t1=self.policy.curve.t1)
            request._spec = Lookahead(self.policy, self.engine, request._sampler, request.prompt)
        self.active.append(request)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> bool:
        """Decode one batch: the next token of every decoding request, then prompt chunks. False when
        there is nothing to do."""
        if self.watch is not None:
            self._relieve()
        self._admit()
        for r in [r for r in self.active if r.emitter.cancelled]:  # cancelled while prefilling or decoding
            self._cancel(r)
        self.active = [r for r in self.active if not r.done]
        if not self.active:
            return False
        batch = self._batch
        batch.clear()
        rows: list[tuple[Request, int, list[int]]] = []  # requests that pick from this step: row, draft
        added: list[tuple[Slot, list[int]]] = []
        prefills: list[tuple[Request, int]] = []  # prompt tokens each request puts in this step
        # (slot, request, tokens, whether its last token picks, draft): laid out by slot below
        parts: list[tuple[Slot, Request, list[int], bool, list[int] | None]] = []
        capacity = self.engine.n_batch
        planned = 0  # tokens in the step so far
        decoding = [r for r in self.active if r._next is not None]
        logit_rows = len(decoding) + sum(1 for r in self.active if r._todo)  # one each, before drafts
        for i, r in enumerate(decoding):
            slot = r.slot
            assert slot is not None and r._next is not None
            draft: list[int] = []
            if r._spec is not None:
                room = min(self.cells - len(slot.tokens) - 2, r.max_tokens - r.emitter.stats.generated_tokens - 1,
                           self.engine.n_outputs - logit_rows, capacity - planned - len(decoding))
                # rows in the step without this draft: those added, this one's and the others' pending tokens
                draft = r._spec.draft([*slot.tokens, r._next], room, planned + len(decoding) - i, len(decoding))
                logit_rows += len(draft)
            parts.append((slot, r, [r._next, *draft], True, draft))
            planned += 1 + len(draft)
        for r in self.active:
            if r._todo and planned < capacity:
                slot = r.slot
                assert slot is not None
                chunk = r._todo[:capacity - planned]
                parts.append((slot, r, chunk, len(chunk) == len(r._todo), None))
                planned += len(chunk)
                prefills.append((r, len(chunk)))
        # sequences in ascending order: llama.cpp splits a batch whose sequences are out of order into a
        # micro-batch per sequence (one graph each, none reused): 4 SmolLM2 sessions took 1.35x as long
        parts.sort(key=lambda part: part[0].kv.seq_id)
        for slot, r, tokens, picks, draft in parts:
            start = len(slot.tokens)
            if draft is not None:  # decoding: every token picks (the pending one, then each drafted)
                row = batch.add(tokens[0], start, (slot.kv.seq_id,), True)
                for j, token in enumerate(tokens[1:], start=1):
                    batch.add(token, start + j, (slot.kv.seq_id,), True)
                rows.append((r, row, draft))
            else:  # a prompt chunk: only the prompt's last token picks
                for j, token in enumerate(tokens):
                    last = picks and j == len(tokens) - 1
                    row = batch.add(token, start + j, (slot.kv.seq_id,), last)
                    if last:
                        rows.append((r, row, []))
            added.append((slot, tokens))
        try:
            batch.decode(self.engine.ctx)
        except EdgeLLMError as e:
            self._fail(added, str(e))
            return True
        self.steps += 1
        for slot, tokens in added:
            slot.tokens.extend(tokens)
        for r, n in prefills:
            del r._todo[:n]
        for r, _, _ in rows:
            r._next = None
        for r, row, draft in rows:
            try:
                if r._spec is None:
                    assert r._sampler is not None
                    self._take(r, r._sampler.sample(self.engine.ctx, row))
                else:
                    self._verify(r, row, draft)
            except EdgeLLMError as e:  # damaged logits: this reply ends, the others go on
                self._end(r, "error", str(e))
        self.active = [r for r in self.active if not r.done]
        return True

    def _fail(self, added: list[tuple[Slot, list[int]]], why: str) -> None:
        """A failed llama_decode: every request in the step ends with the error, each slot keeps what it
        held before the step; the requests that were not in it go on."""
        for slot, _ in added:
            slot.kv.forget_unheld()  # whatever llama.cpp placed of this step goes
        in_step = {id(slot) for slot, _ in added}
        for r in [r for r in self.active if r.slot is not None and id(r.slot) in in_step]:
            self._end(r, "error", f"decoding failed: {why}")
        self.active = [r for r in self.active if not r.done]

    def _cancel(self, r: Request) -> None:
        """A cancel seen between steps: the reply ends; the slot keeps the tokens it has decoded."""
        if r._todo:  # the prompt is only partly in the KV cache: the slot is no one's prefix
            assert r.slot is not None
            r.slot.session = None
        self._end(r, "cancelled")

    def _relieve(self) -> None:
        """One stage of giving way per low reading; back to accepting sessions once memory is back."""
        assert self.watch is not None
        if not self.watch.low():
            self.accepting = True
            return
        what = None
        while self.reliefs and what is None:
            what = self.reliefs.pop(0)()
        if what is None:
            idle = [s for s in self.slots if not s.busy and s.tokens]
            if idle:
                for slot in idle:
                    self._swap_out(slot)
                what = f"{len(idle)} idle conversation(s) moved out of memory"
        if what is None and self.accepting:
            self.accepting = False
            what = "new sessions refused until memory frees"
        if what:
            self.events.append(what)
            for r in self.active:
                r.records.append(r.emitter.event(f"memory low: {what}"))

    def _verify(self, r: Request, row: int, draft: list[int]) -> None:
        """The drafted tokens the target keeps, then its own next token; rejected ones leave the KV."""
        assert r._spec is not None and r.slot is not None
        before = len(r.slot.tokens) - len(draft)  # the pending token and the draft were appended
        path, token = r._spec.verify(row, draft)
        self._rewind(r.slot, before + len(path))
        if draft and r.emitter.drafting is not None:
            r.emitter.drafting.drafted_tokens += len(draft)
            r.emitter.drafting.draft_steps += 1
        for i, accepted in enumerate(path):
            if not self._take(r, accepted, from_draft=True):  # finished on a drafted token
                self._rewind(r.slot, before + i)
                r._spec.settle(r.slot.tokens, len(draft), i + 1)
                return
        r._spec.settle(r.slot.tokens, len(draft), len(path))
        if not r._spec.pays:  # lookups cost this sequence more than they return: decode plainly
            r._spec.close()
            r._spec = None
        self._take(r, token)

    def _rewind(self, slot: Slot, n: int) -> None:
        try:
            slot.kv.trim(n)
        except CacheTrimError:  # speculation is refused for such models (speculative/setup.py): a safety net
            slot.session = None

    def _take(self, r: Request, token: int, from_draft: bool = False) -> bool:
        """Emit a token the target chose; False when the reply ended with it. A drafted token is in the
        KV cache already; any other becomes the next step's pending token."""
        record = r.emitter.emit(token, from_draft)
        r.records.append(record)
        if record.finish_reason:
            self._finish(r)
            return False
        if not from_draft:
            r._next = token
        return True

    def _end(self, r: Request, reason: str, event: str | None = None) -> None:
        r.records.append(r.emitter.end(reason, event))
        self._finish(r)

    def _finish(self, r: Request) -> None:
        r.done = True
        r._next = None
        if r._spec is not None:
            r._spec.close()
        if r._sampler is not None:
            r._sampler.close()
        slot = r.slot
        if slot is not None:
            slot.busy, slot.last_used = False, time.monotonic()

    def close(self) -> None:
        self._batch.free()
        for path in self.swapped.values():
            kvfile.remove(path)
        self.swapped.clear()

