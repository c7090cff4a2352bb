"""Drafters: given the tokens so far, propose the next few. One small interface, several sources.

- `PromptLookup`: n-gram matching over the prompt and the output so far (free: no model runs).
- `EditAwareLookup`: prompt lookup that also learns the substitutions the output has made to the
  text it copies (a rename of `foo` to `bar`) and applies them to what it proposes next.
- `DraftModel`: a small model with the same vocabulary proposes greedily.
- `Combined`: the free lookup draft when it matches, the model otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from edgellm.errors import EdgeLLMError


class Drafter(Protocol):
    name: str
    costly: bool  # proposing runs a model (its time counts against the draft)

    def start(self, prompt: Sequence[int]) -> None:
        """A new generation begins with this prompt."""

    def propose(self, tokens: Sequence[int], n: int) -> list[int]:
        """Up to n tokens that might follow `tokens` (the prompt and the output so far)."""

    def feedback(self, tokens: Sequence[int], n_accepted: int) -> None:
        """The target accepted the first n_accepted of the last proposal; `tokens` is the new context."""


class NgramIndex:
    """Positions of every n-gram (n = min_n..max_n) in a growing token list, updated incrementally."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.where: dict[tuple[int, ...], list[int]] = defaultdict(list)  # n-gram -> end positions

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(self.min_n, self.max_n + 1):
                if end >= n:
                    self.where[tuple(self.tokens[end - n:end])].append(end)

    def sync(self, tokens: Sequence[int]) -> None:
        """Make the index hold exactly `tokens` (they usually extend what it holds)."""
        held = len(self.tokens)
        if len(tokens) >= held and tokens[held - 1:held] == self.tokens[-1:]:
            self.extend(tokens[held:])
        else:
            self.__init__(self.min_n, self.max_n)
            self.extend(tokens)

    def all_continuations(self, n_max: int) -> list[int]:
        """Ends of earlier occurrences of every suffix n-gram, longest n-grams first, newest first."""
        end = len(self.tokens)
        out: list[int] = []
        for n in range(self.max_n, self.min_n - 1, -1):
            if end >= n:
                out += [e for e in self.where.get(tuple(self.tokens[end - n:]), ())[::-1]
                        if e < end and e not in out]
        return out[:n_max]

    def continuations(self, n_max: int) -> list[int]:
        """Ends of the earlier occurrences of the longest suffix n-gram that occurs before, newest first."""
        end = len(self.tokens)
        for n in range(self.max_n, self.min_n - 1, -1):
            if end < n:
                continue
            ends = [e for e in self.where.get(tuple(self.tokens[end - n:]), ()) if e < end]
            if ends:
                return ends[::-1][:n_max]
        return []


class PromptLookup:
    """Copy what followed the last earlier occurrence of the context's final n-gram."""

    name = "lookup"
    costly = False

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.index = NgramIndex(min_n, max_n)

    def start(self, prompt: Sequence[int]) -> None:
        self.index = NgramIndex(self.index.min_n, self.index.max_n)
        self.index.extend(prompt)

    def propose(self, tokens: Sequence[int], n: int) -> list[int]:
        self.index.sync(tokens)
        for end in self.index.continuations(4):
            draft = self.index.tokens[end:end + n]
            if draft:
                return draft
        return []

    def feedback(self, tokens: Sequence[int], n_accepted: int) -> None:
        self.index.sync(tokens)

    def _continuation(self, end: int, n: int) -> list[int]:
        return self.index.tokens[end:end + n]

    def alternatives(self, tokens: Sequence[int], n: int, count: int) -> list[list[int]]:
        """Continuations from other earlier matches (shorter n-grams too), distinct by first token."""
        self.index.sync(tokens)
        seen: set[int] = set()
        out = []
        for end in self.index.all_continuations(32):
            draft = self._continuation(end, n)
            if draft and draft[0] not in seen:
                seen.add(draft[0])
                out.append(draft)
        return out[:count + 1]  # the caller drops the one its main draft starts with


class EditAwareLookup(PromptLookup):
    """Prompt lookup that learns substitutions from the output and applies them to its copies.

    While the output copies a stretch of the prompt, a `cursor` follows along in the prompt. When the
    output departs from it and later meets the prompt again, the prompt span it skipped and the output
    span it wrote instead form a substitution (`old_name` -> `new_name`); later copies apply it, so a
    rename does not break the draft at every use of the renamed name.
    """

    name = "edit"
    MAX_SUB = 8  # longest span (tokens) on either side of a substitution
    RESYNC = 2  # tokens that must agree again to end a departure
    WINDOW = 32  # how far past a departure the output may meet the prompt again

    def start(self, prompt: Sequence[int]) -> None:
        super().start(prompt)
        self.source = list(prompt)
        self.subs: dict[tuple[int, ...], tuple[int, ...]] = {}
        self.cursor: int | None = None  # position in the prompt that the output is copying
        self.depart: tuple[int, int] | None = None  # (prompt position, output position) of a departure
        self.followed = len(prompt)  # tokens of the context that _follow has seen
        self.run = 0  # output tokens copied in a row since the last departure
        self.mode = "lookup"  # where the last proposal came from: copy | start | lookup

    def _apply_subs(self, tokens: list[int]) -> list[int]:
        if not self.subs:
            return tokens
        out, i = [], 0
        while i < len(tokens):
            for old, new in self.subs.items():
                if tuple(tokens[i:i + len(old)]) == old:
                    out.extend(new)
                    i += len(old)
                    break
            else:
                out.append(tokens[i])
                i += 1
        return out

    def _follow(self, tokens: Sequence[int], end: int) -> None:
        """Account for output token tokens[end - 1]: advance the cursor, or learn from a re-sync."""
        if self.cursor is not None and self.depart is None:
            if self.cursor < len(self.source) and tokens[end - 1] == self.source[self.cursor]:
                self.cursor += 1
                self.run += 1
            else:
                self.depart = (self.cursor, end - 1)
                self.run = 0
            return
        if self.depart is None:
            return
        src0, out0 = self.depart
        tail = tuple(tokens[end - self.RESYNC:end])
        for j in range(src0, min(len(self.source), src0 + self.WINDOW) - self.RESYNC + 1):
            if tuple(self.source[j:j + self.RESYNC]) == tail:
                old, new = tuple(self.source[src0:j]), tuple(tokens[out0:end - self.RESYNC])
                if old and new and old != new and len(old) <= self.MAX_SUB and len(new) <= self.MAX_SUB:
                    self.subs[old] = new  # a replacement; an insertion (old empty) is not reusable
                self.cursor, self.depart = j + self.RESYNC, None
                return
        if end - out0 > self.WINDOW:
            self.cursor = self.depart = None  # lost: find the place again by lookup

    def _catch_up(self, tokens: Sequence[int]) -> None:
        self.index.sync(tokens)
        for end in range(self.followed + 1, len(tokens) + 1):
            self._follow(tokens, end)
        self.followed = len(tokens)
        if self.cursor is None:
            inside = [e for e in self.index.continuations(8) if e <= len(self.source)]
            if inside:
                self.cursor = inside[0]

    def _copy(self, start: int, n: int) -> list[int]:
        return self._apply_subs(self.source[start:start + n + self.MAX_SUB])[:n]

    def _continuation(self, end: int, n: int) -> list[int]:
        return self._copy(end, n) if end <= len(self.source) else self.index.tokens[end:end + n]

    def propose(self, tokens: Sequence[int], n: int) -> list[int]:
        self._catch_up(tokens)
        if self.cursor is not None and self.depart is None and self.cursor < len(self.source):
            self.mode = "copy" if self.run >= 8 else "start"
            return self._copy(self.cursor, n)
        self.mode = "lookup"
        for end in self.index.continuations(4):
            draft = self._continuation(end, n)
            if draft:
                return draft
        return []

    def feedback(self, tokens: Sequence[int], n_accepted: int) -> None:
        self._catch_up(tokens)


def check_vocab_compatible(target, draft) -> None:
    """A draft model must tokenize like the target: same vocabulary size (within padding) and pieces."""
    n_t, n_d = target.n_vocab, draft.n_vocab
    if abs(n_t - n_d) > 128:
        raise EdgeLLMError(f"draft model {draft.path.name} has a vocabulary of {n_d} tokens, the target "
                           f"{n_t}: they are not compatible; pick a draft from the target's family")
    for token in (*range(0, min(n_t, n_d), max(1, min(n_t, n_d) // 997)), min(n_t, n_d) - 1):
        if target.token_bytes(token, special=True) != draft.token_bytes(token, special=True):
            raise EdgeLLMError(f"draft model {draft.path.name} maps token {token} differently from the "
                               "target: the vocabularies are not compatible")


class DraftModel:
    """A small model with the target's vocabulary proposes greedily; its KV cache follows the context."""

    name = "draft"
    costly = True

    def __init__(self, engine) -> None:
        self.engine = engine

    def start(self, prompt: Sequence[int]) -> None:
        self.engine.prefill(list(prompt))

    def propose(self, tokens: Sequence[int], n: int) -> list[int]:
        e = self.engine
        e.prefill(list(tokens))  # reuses its KV: usually decodes only the last accepted tokens
        draft: list[int] = []
        for _ in range(n):
            token = int(e.logits(-1).argmax())
            draft.append(token)
            if len(draft) == n or e.is_eog(token):
                break
            e.decode([token])
        return draft

    def feedback(self, tokens: Sequence[int], n_accepted: int) -> None:
        pass  # the next prefill() drops what the target rejected


class Combined:
    """Several drafters in order of preference: the free lookup draft when there is one, else the model."""

    def __init__(self, *parts: Drafter) -> None:
        self.parts = list(parts)  # a list: a running generation sees a part dropped (memory pressure)
        self.name = "+".join(p.name for p in parts)

    def drop_costly(self) -> None:
        self.parts[:] = [p for p in self.parts if not p.costly]

    def start(self, prompt: Sequence[int]) -> None:
        for part in self.parts:
            part.start(prompt)

    def feedback(self, tokens: Sequence[int], n_accepted: int) -> None:
        for part in self.parts:
            part.feedback(tokens, n_accepted)
