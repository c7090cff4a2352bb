"""A context's KV sequences and the batches that feed them: the engine, token trees and the scheduler use
these instead of calling llama.cpp's memory and batch functions themselves."""

from __future__ import annotations

from collections.abc import Sequence

import llama_cpp as C

from edgellm.errors import CacheTrimError, EdgeLLMError


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences share (what a KV cache can keep for a new prompt)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class KVSequence:
    """One sequence of a context's KV cache and the tokens it holds, position by position."""

    def __init__(self, ctx: C.llama_context_p, seq_id: int) -> None:
        self.ctx = ctx
        self.memory = C.llama_get_memory(ctx)
        self.seq_id = seq_id
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def trim(self, n: int) -> None:
        """Keep the first n positions; drop the rest.

        Where llama.cpp cannot drop a tail (a recurrent state, sliding-window layers whose window has
        moved past n: it then wipes the whole sequence and still reports success, so the positions left
        are checked) the sequence is emptied and CacheTrimError tells the caller to decode again what it
        needs: a sequence is never believed to hold what it does not.
        """
        if n >= len(self.tokens):
            return
        dropped = bool(C.llama_memory_seq_rm(self.memory, self.seq_id, n, -1))
        if dropped and C.llama_memory_seq_pos_max(self.memory, self.seq_id) != n - 1:
            dropped = False
        if not dropped:
            cut = len(self.tokens) - n
            self.clear()
            raise CacheTrimError(f"the KV cache could not drop its last {cut} positions and was emptied")
        del self.tokens[n:]

    def forget_unheld(self) -> None:
        """Drop any cells past the tokens it holds (what a failed llama_decode may have placed)."""
        C.llama_memory_seq_rm(self.memory, self.seq_id, len(self.tokens), -1)

    def clear(self) -> None:
        C.llama_memory_seq_rm(self.memory, self.seq_id, -1, -1)
        self.tokens = []

    @property
    def nbytes(self) -> int:
        """Bytes of its KV state (what saving it to disk writes)."""
        return int(C.llama_state_seq_get_size(self.ctx, self.seq_id))

    def share_cells(self, dest: int, p0: int = -1, p1: int = -1) -> None:
        """Make positions [p0, p1) visible to sequence `dest` too (no copy in a unified cache)."""
        C.llama_memory_seq_cp(self.memory, self.seq_id, dest, p0, p1)


class TokenBatch:
    """A reusable llama_batch: rows of (token, position, sequences, wants logits), then one decode."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        self.capacity = capacity
        self.raw = C.llama_batch_init(capacity, 0, n_seq_max)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq_ids: Sequence[int], logits: bool) -> int:
        """Append a row; returns its index (the logits row to read after the decode)."""
        if self.n >= self.capacity:
            raise EdgeLLMError(f"a batch holds at most {self.capacity} tokens")
        b, i = self.raw, self.n
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = len(seq_ids)
        for j, seq in enumerate(seq_ids):
            b.seq_id[i][j] = seq
        b.logits[i] = logits
        self.n += 1
        return i

    def fill(self, tokens: Sequence[int], start_pos: int, logits_last: bool = True, seq_id: int = 0,
             all_logits: bool = False) -> None:
        """The batch is `tokens` of one sequence from `start_pos`: logits for the last (or every) one."""
        b, n = self.raw, len(tokens)
        for i, token in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = start_pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_id
            b.logits[i] = all_logits
        if logits_last and n:
            b.logits[n - 1] = True
        self.n = b.n_tokens = n

    def decode(self, ctx: C.llama_context_p) -> None:
        self.raw.n_tokens = self.n
        rc = C.llama_decode(ctx, self.raw)
        if rc != 0:
            raise EdgeLLMError(f"llama_decode failed with code {rc} "
                               f"({'KV cache full' if rc == 1 else 'compute error'})")

    def free(self) -> None:
        if self.raw is not None:
            C.llama_batch_free(self.raw)
            self.raw = None
