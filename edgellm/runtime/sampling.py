"""Sampling settings -> llama.cpp's native sampler chain (the sampling itself runs in C).

One `Sampler` per reply. With no draft to verify, the chain picks the token (`sample`). To verify a
drafted token by rejection sampling, the chain's filters (penalties, top-k, top-p, min-p, temperature:
every member but the last, which picks) run on a `llama_token_data_array` of the row's logits, and the
target's probabilities are those of the few candidates left (`verify`). Nothing walks the whole
vocabulary in Python on a token that is not verified.
"""

from __future__ import annotations

import ctypes
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp as C
import numpy as np

from edgellm.errors import EdgeLLMError


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

    def __init__(self, params: SamplingParams, n_vocab: int, history: Sequence[int] = ()) -> None:
        self.params, self.n_vocab = params, n_vocab
        self.argmax_only = params.greedy and not params.penalized
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        self.rng = np.random.default_rng(seed)  # the verification's coin; the chain's dist has its own
        chain_params = C.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._chain = C.llama_sampler_chain_init(chain_params)
        add = lambda s: C.llama_sampler_chain_add(self._chain, s)  # noqa: E731
        if params.penalized:
            add(C.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty,
                                               params.frequency_penalty, params.presence_penalty))
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
        self.generated = 0
        if params.penalized:  # the penalty window starts with the prompt, as in llama.cpp
            for token in history[-params.repeat_last_n:]:
                C.llama_sampler_accept(self._chain, token)

    # -- no draft: the chain picks ------------------------------------------------------------------
    def sample(self, ctx: ctypes.c_void_p, index: int = -1) -> int:
        row = logits_row(ctx, self.n_vocab, index)
        token = int(row.argmax()) if self.argmax_only else C.llama_sampler_sample(self._chain, ctx, index)
        self._check(row, token)
        return token

    def accept(self, token: int) -> None:
        """A token taken without `sample` (a kept draft): the penalty window moves on."""
        if not self.argmax_only:
            C.llama_sampler_accept(self._chain, token)
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
        if self.argmax_only:
            best = int(row.argmax())
            self._finite(row[best])
            return np.array([best]), np.array([1.0])
        data = self._data
        if data is None:
            data = self._data = np.empty(self.n_vocab, dtype=TOKEN_DATA)
        data["id"] = np.arange(self.n_vocab, dtype=np.int32)
        data["logit"] = row
        data["p"] = 0.0
        arr = C.llama_token_data_array(data.ctypes.data_as(C.llama_token_data_p), self.n_vocab, -1, False)
        for f in self._filters:
            C.llama_sampler_apply(f, ctypes.byref(arr))
        left = data[:arr.size]
        if self.params.greedy:  # the penalty ran; the greedy picker's choice is the best left
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

    def __del__(self) -> None:
        self.close()
