"""Sampling settings -> llama.cpp's native sampler chain (the sampling itself runs in C).

One `Sampler` per reply. With no draft to verify, the chain picks the token (`sample`). To verify a
drafted token by rejection sampling, the chain's filters (top-k, top-p, min-p, temperature:
every member but the last, which picks) run on a `llama_token_data_array` of the row's logits, and the
target's probabilities are those of the few candidates left (`verify`). Nothing walks the whole
vocabulary in Python on a token that is not verified.

With a grammar (structured output, tool calls; runtime/grammar.py) llama.cpp's grammar sampler sets the
logit of every token the grammar does not allow next to -inf. Asking it about the whole vocabulary costs
4 ms a token on SmolLM2 and 10 ms on Qwen's 152k, so it is asked as llama.cpp's common sampler asks it: the
chain picks from the row as it is, the grammar is asked about that one token, and only when it refuses is
the row masked by the grammar and the chain run again. A token's probability is then p(x)·[allowed] plus
p(refused)·q(x), q being the chain's over the masked row; `candidates` computes exactly that (q only when a
candidate is refused), so a drafted token is verified against what plain decoding would do and speculation
stays lossless. The grammar's apply only reads its state (llama_grammar_apply_impl takes it const); only
accept advances it, so rows whose drafts are rejected leave no trace. Once the grammar is complete only
end-of-generation tokens are left: the reply ends with the JSON.

Penalties (repeat, frequency, presence) touch only the tokens of the last `repeat_last_n`, but llama.cpp's
penalty sampler looks every candidate up in its table: the whole vocabulary on each row, about a millisecond
on Qwen's 152k, per token and per sequence in a batch. So the window is kept here and the same arithmetic
(float32, as llama-sampler.cpp) is applied to those few logits in the row, in place, for as long as the chain
reads the row; then the row is put back as llama.cpp wrote it.
"""

from __future__ import annotations

import ctypes
import math
import random
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import llama_cpp as C
import numpy as np

from edgellm.errors import EdgeLLMError
from edgellm.runtime.grammar import GrammarError


@dataclass(frozen=True)
class SamplingParams:
    # llama.cpp's defaults; a model's own come from model_defaults.resolve_defaults
    temperature: float = 0.8  # 0 or less: greedy
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0  # 1.0: off (llama.cpp's default)
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0  # 0.0: off (OpenAI's and llama.cpp's)
    presence_penalty: float = 0.0  # 0.0: off
    seed: int | None = None  # None: a fresh random seed each generation
    grammar: str | None = None  # GBNF text the reply must follow (runtime/grammar.py); None: free text

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def penalized(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @classmethod
    def greedy_params(cls) -> SamplingParams:
        return cls(temperature=0.0)


class DamagedLogits(EdgeLLMError):
    """The model produced NaN or infinite logits: its weights are likely damaged."""


def damaged(generated: int) -> DamagedLogits:
    return DamagedLogits(f"the model produced NaN or infinite logits after {generated} token(s): its weights may be "
                         "damaged; check the file with `edgellm models verify`")


def logits_row(ctx: ctypes.c_void_p, n_vocab: int, index: int = -1) -> np.ndarray:
    """Output row `index` of the last decoded batch (-1: the last), as a numpy view (no copy)."""
    return np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, index), shape=(n_vocab,))


GRAMMAR_WINDOW = 128  # greedy under a grammar: the best logits the grammar is asked about before the whole row

# llama_token_data is {int32 id; float logit; float p}: a numpy view of the same layout fills it in one copy
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert TOKEN_DATA.itemsize == ctypes.sizeof(C.llama_token_data)


class Sampler:
    """Owns one llama_sampler chain for one reply.

    `sample(ctx, row)` picks a token from an output row and records it (the penalty window); `verify`
    keeps or replaces a drafted token so that the output follows the chain's distribution exactly;
    `accept` records a token chosen elsewhere (a kept draft). A non-finite logit under the chosen token
    raises DamagedLogits. Plain greedy decoding skips the chain: argmax over the row picks the same token
    (the first maximum, as llama.cpp's greedy sampler) in 7 µs instead of 50 µs.
    """

    def __init__(self, params: SamplingParams, n_vocab: int, history: Sequence[int] = (),
                 vocab: ctypes.c_void_p | None = None) -> None:
        """`vocab`: the model's llama_vocab pointer, which a grammar needs (its tokens' text)."""
        self.params, self.n_vocab = params, n_vocab
        self._chain = None
        self.argmax_only = params.greedy and params.grammar is None
        # greedy under a grammar: the grammar is asked about the argmax, then about the best logits of the row
        # (the whole vocabulary costs 4 ms on SmolLM2, 10 ms on Qwen's 152k): the first maximum among the tokens it
        # allows is the chain's choice too
        self._greedy_grammar = params.greedy and params.grammar is not None
        # the penalty window (llama.cpp's ring buffer and token counts); None: no penalty
        self._recent: deque[int] | None = None
        self._counts: Counter[int] = Counter()
        if params.penalized and params.repeat_last_n > 0:
            self._recent = deque(maxlen=params.repeat_last_n)
            self._repeat = np.float32(params.repeat_penalty)
            self._frequency = np.float32(params.frequency_penalty)
            self._presence = np.float32(params.presence_penalty)
        self._grammar = None
        if params.grammar is not None:
            if vocab is None:
                raise ValueError("a grammar needs the model's vocabulary")
            self._grammar = C.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
            if not self._grammar:
                raise GrammarError("llama.cpp refused the grammar")
            self._window = np.zeros(GRAMMAR_WINDOW + 1, dtype=TOKEN_DATA)
        # any integer a client sends is a seed (Ollama's -1 included): 32 bits of it, as the dist sampler takes
        seed = params.seed & 0xFFFFFFFF if params.seed is not None else random.getrandbits(32)
        self.rng = np.random.default_rng(seed)  # the verification's coin; the chain's dist has its own
        chain_params = C.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = C.llama_sampler_chain_init(chain_params)
        add = lambda s: C.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        if params.greedy:
            add(C.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(C.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(C.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(C.llama_sampler_init_min_p(params.min_p, 1))
            add(C.llama_sampler_init_temp(params.temperature))
            add(C.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        self._filters = [C.llama_sampler_chain_get(self._chain, i)
                         for i in range(C.llama_sampler_chain_n(self._chain) - 1)]  # all but the picker
        self._data: np.ndarray | None = None  # the candidates' buffer, made on the first verification
        # min-p as the first filter (SmolLM2's defaults, no top-k or top-p): the row is cut to the tokens within
        # reach of it in numpy, a little wider than min-p, in their order; the chain's own min-p then keeps exactly
        # what it keeps from the whole row (the same max, the same survivors in the same order) and the picker
        # draws the same token, without building a llama_token_data for every token of the vocabulary
        self._reach = None
        if not params.greedy and params.top_k <= 0 and params.top_p >= 1.0 and params.min_p > 0.0:
            self._reach = math.log(params.min_p) - 1e-3
            self._near = np.zeros(256, dtype=TOKEN_DATA)
        self.generated = 0
        if self._recent is not None:  # the penalty window starts with the prompt, as in llama.cpp (not the grammar)
            for token in history[-params.repeat_last_n:]:
                self._remember(token)

    # -- the penalty window -------------------------------------------------------------------------
    def _remember(self, token: int) -> None:
        recent = self._recent
        if recent is None:
            return
        if len(recent) == recent.maxlen:
            old = recent[0]
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        recent.append(token)
        self._counts[token] += 1

    @contextmanager
    def _penalized(self, row: np.ndarray) -> Iterator[None]:
        """The row with the window's penalties applied (llama_sampler_penalties_apply's arithmetic), restored after."""
        if not self._counts:
            yield
            return
        ids = np.fromiter(self._counts.keys(), dtype=np.intp, count=len(self._counts))
        counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
        saved = row[ids].copy()
        logit = np.where(saved <= 0, saved * self._repeat, saved / self._repeat)
        row[ids] = logit - (counts * self._frequency + np.float32(1.0) * self._presence)
        try:
            yield
        finally:
            row[ids] = saved

    # -- no draft: the chain picks ------------------------------------------------------------------
    def sample(self, ctx: ctypes.c_void_p, index: int = -1) -> int:
        row = logits_row(ctx, self.n_vocab, index)
        with self._penalized(row):
            if self.argmax_only:
                token = int(row.argmax())
            elif self._grammar is None:
                token = self._sample_near(row) if self._reach is not None else -1
                if token < 0:
                    token = C.llama_sampler_sample(self._chain, ctx, index)
            else:
                best = self._best_allowed(row) if self._greedy_grammar else None
                token = best if best is not None else self._sample_allowed(row)
                C.llama_sampler_accept(self._grammar, token)  # the grammar moves on
            self._check(row, token)
        self._remember(token)
        return token

    def _sample_near(self, row: np.ndarray) -> int:
        """The chain's pick from the tokens min-p can keep (see __init__); -1 when the row has no finite maximum."""
        assert self._reach is not None
        top = row.max()
        if not math.isfinite(top):
            return -1
        near = np.flatnonzero(row >= top + self._reach)
        n = len(near)
        if n > len(self._near):
            self._near = np.zeros(2 * n, dtype=TOKEN_DATA)
        buf = self._near[:n]
        buf["id"], buf["logit"], buf["p"] = near, row[near], 0.0
        arr = C.llama_token_data_array(buf.ctypes.data_as(C.llama_token_data_p), n, -1, False)
        C.llama_sampler_apply(self._chain, ctypes.byref(arr))
        token = int(buf["id"][arr.selected])
        C.llama_sampler_accept(self._chain, token)  # as llama_sampler_sample does after its apply
        return token

    def _full(self, row: np.ndarray, masked: bool) -> tuple[np.ndarray, C.llama_token_data_array]:
        """The whole row as a llama_token_data_array (masked: the grammar's refusals at -inf)."""
        data = self._data
        if data is None:
            data = self._data = np.empty(self.n_vocab, dtype=TOKEN_DATA)
        data["id"] = np.arange(self.n_vocab, dtype=np.int32)
        data["logit"] = row
        data["p"] = 0.0
        arr = C.llama_token_data_array(data.ctypes.data_as(C.llama_token_data_p), self.n_vocab, -1, False)
        if masked:
            C.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return data, arr

    def _sample_allowed(self, row: np.ndarray) -> int:
        """The chain's pick from the row; when the grammar refuses it, its pick from the masked row."""
        for masked in (False, True):
            data, arr = self._full(row, masked)
            C.llama_sampler_apply(self._chain, ctypes.byref(arr))  # its picker sets `selected`; nothing accepted
            token = int(data["id"][arr.selected])
            if masked or self._allowed(np.array([token]))[0]:
                if masked and np.isneginf(data["logit"][arr.selected]):
                    raise GrammarError(f"the grammar allows no token after {self.generated} token(s)")
                return token
        raise AssertionError("unreachable")

    def _allowed(self, tokens: np.ndarray) -> np.ndarray:
        """Which of `tokens` the grammar allows next (its apply on a small array; its state is unchanged)."""
        n = len(tokens)
        if n > len(self._window):
            self._window = np.zeros(n, dtype=TOKEN_DATA)
        buf = self._window[:n]
        buf["id"], buf["logit"], buf["p"] = tokens, 0.0, 0.0
        arr = C.llama_token_data_array(buf.ctypes.data_as(C.llama_token_data_p), n, -1, False)
        C.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        return np.isfinite(buf["logit"])

    def _best_allowed(self, row: np.ndarray) -> int | None:
        """The first maximum of `row` among the tokens the grammar allows, found among the best logits; None
        when none of those is allowed (or a tie at the window's edge leaves it open): the whole row decides."""
        best = int(row.argmax())
        if self._allowed(np.array([best]))[0]:
            return best
        n = min(GRAMMAR_WINDOW, self.n_vocab - 1)
        part = np.argpartition(row, len(row) - 1 - n)  # part[-n:]: the n best; part[-n - 1]: the best left out
        top = part[-n:]
        top = top[np.lexsort((top, -row[top]))]  # best first, the lower id first on a tie (the first maximum)
        ok = np.flatnonzero(self._allowed(top))
        if not ok.size or row[top[ok[0]]] <= row[part[-n - 1]]:
            return None
        return int(top[ok[0]])

    def accept(self, token: int) -> None:
        """A token taken without `sample` (a kept draft): the penalty window and the grammar move on."""
        if self._grammar is not None:
            C.llama_sampler_accept(self._grammar, token)
        self._remember(token)
        self.generated += 1

    def _check(self, row: np.ndarray, token: int) -> None:
        if not math.isfinite(row[token]):
            raise damaged(self.generated)
        self.generated += 1

    # -- a drafted token: keep it, or the token the target puts in its place ------------------------
    def candidates(self, ctx: ctypes.c_void_p, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, probabilities) the chain would pick from at output row `index`, after its filters.

        Greedy: the single best token (after the penalty) with probability 1.
        """
        row = logits_row(ctx, self.n_vocab, index)
        with self._penalized(row):
            return self._candidates(row)

    def _candidates(self, row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        best = int(row.argmax()) if self.argmax_only else self._best_allowed(row) if self._greedy_grammar else None
        if best is not None:
            self._finite(row[best])
            return np.array([best]), np.array([1.0])
        ids, p = self._filtered(row, masked=False)
        if self._grammar is None:
            return ids, p
        ok = self._allowed(ids.astype(np.int32))
        if ok.all():
            return ids, p
        if self.params.greedy:  # the best refused: the best the grammar allows
            return self._filtered(row, masked=True)
        refused = float(p[~ok].sum())  # the chance the first pick is refused and the masked row decides
        q_ids, q = self._filtered(row, masked=True)
        mix = dict(zip(ids[ok].tolist(), p[ok].tolist(), strict=True))
        for t, w in zip(q_ids.tolist(), q.tolist(), strict=True):
            mix[t] = mix.get(t, 0.0) + refused * w
        out_ids = np.fromiter(mix.keys(), dtype=np.int64, count=len(mix))
        out_p = np.fromiter(mix.values(), dtype=np.float64, count=len(mix))
        return out_ids, out_p / out_p.sum()

    def _filtered(self, row: np.ndarray, masked: bool) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) after the chain's filters (greedy: the one best, with 1)."""
        data, arr = self._full(row, masked)
        for f in self._filters:
            C.llama_sampler_apply(f, ctypes.byref(arr))
        left = data[:arr.size]
        if masked:  # the tokens it refused are -inf; a NaN or +inf still counts as damage
            left = left[~np.isneginf(left["logit"])]
            if not left.size:
                raise GrammarError(f"the grammar allows no token after {self.generated} token(s)")
        if self.params.greedy:  # the greedy picker's choice is the best left
            best = int(left["id"][int(left["logit"].argmax())])
            self._finite(row[best])
            return np.array([best]), np.array([1.0])
        z = left["logit"].astype(np.float64)
        if not np.isfinite(z).all():
            raise damaged(self.generated)
        p = np.exp(z - z.max())
        return left["id"].astype(np.int64), p / p.sum()

    def _finite(self, logit: float) -> None:
        if not math.isfinite(logit):
            raise damaged(self.generated)

    def verify(self, ctx: ctypes.c_void_p, index: int, draft: int) -> tuple[bool, int]:
        """(kept, token) at output row `index` for a drafted token (deterministic drafts: q(d) = 1).

        Kept with probability p(d); else a token drawn from p with d removed. The chosen token is
        recorded as `sample` records it.
        """
        ids, p = self.candidates(ctx, index)
        hit = np.flatnonzero(ids == draft)
        p_draft = float(p[hit[0]]) if hit.size else 0.0
        if p_draft >= 1.0 or (p_draft > 0.0 and self.rng.random() < p_draft):
            self.accept(draft)
            return True, draft
        if hit.size:
            p = p.copy()
            p[hit[0]] = 0.0
            p /= p.sum()
        token = int(ids[0]) if ids.size == 1 else int(ids[self.rng.choice(ids.size, p=p)])
        self.accept(token)
        return False, token

    def close(self) -> None:
        if self._chain:
            C.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar:
            C.llama_sampler_free(self._grammar)  # no longer in the chain: its own
            self._grammar = None

    def __del__(self) -> None:
        self.close()
