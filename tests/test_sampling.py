"""The sampler's penalties against llama.cpp's own penalty sampler, on a real model's logits."""

from __future__ import annotations

import ctypes

import llama_cpp as C
import numpy as np
import pytest

from edgellm.runtime.engine import Engine
from edgellm.runtime.sampling import TOKEN_DATA, Sampler, SamplingParams

PENALTIES = {
    "repeat": dict(repeat_penalty=1.3),
    "frequency+presence": dict(frequency_penalty=0.7, presence_penalty=0.4),
    "all, a short window": dict(repeat_penalty=1.1, frequency_penalty=0.3, presence_penalty=-0.5, repeat_last_n=8),
}


@pytest.fixture
def prompted(engine: Engine) -> list[int]:
    """A prompt whose tokens repeat (so the window counts some of them more than once), prefilled."""
    engine.reset()
    prompt = engine.chat_tokens([{"role": "user", "content": "Say cat, cat, dog, cat, dog, fish, cat."}])
    engine.prefill(prompt)
    return prompt


def reference_chain(params: SamplingParams, n_vocab: int, history: list[int], seed: int) -> ctypes.c_void_p:
    """llama.cpp's own chain with its penalty sampler first, the window filled from the history."""
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    penalties = C.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty,
                                               params.frequency_penalty, params.presence_penalty)
    C.llama_sampler_chain_add(chain, penalties)
    if params.greedy:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
    else:
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(params.top_k))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(params.top_p, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_min_p(params.min_p, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(params.temperature))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
    for token in history[-params.repeat_last_n:]:
        C.llama_sampler_accept(penalties, token)
    return chain


def penalized_logits(params: SamplingParams, row: np.ndarray, history: list[int]) -> np.ndarray:
    """The whole row after llama.cpp's penalty sampler alone (its apply on a copy)."""
    penalties = C.llama_sampler_init_penalties(len(row), params.repeat_last_n, params.repeat_penalty,
                                               params.frequency_penalty, params.presence_penalty)
    for token in history[-params.repeat_last_n:]:
        C.llama_sampler_accept(penalties, token)
    data = np.zeros(len(row), dtype=TOKEN_DATA)
    data["id"], data["logit"] = np.arange(len(row)), row
    arr = C.llama_token_data_array(data.ctypes.data_as(C.llama_token_data_p), len(row), -1, False)
    C.llama_sampler_apply(penalties, ctypes.byref(arr))
    C.llama_sampler_free(penalties)
    return data["logit"].copy()


FILTERS = {
    "top-k, top-p, min-p": dict(top_k=40, top_p=0.95, min_p=0.02),
    "min-p alone (the row cut to its reach first)": dict(top_k=0, top_p=1.0, min_p=0.01),
}


@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("penalty", list(PENALTIES))
def test_penalties_pick_what_llama_cpps_penalty_sampler_picks(engine: Engine, prompted: list[int], penalty: str,
                                                              filters: str):
    params = SamplingParams(temperature=1.0, **FILTERS[filters], **PENALTIES[penalty])
    before = engine.logits(-1).copy()
    expected = penalized_logits(params, before, prompted)
    changed = np.flatnonzero(expected != before)
    assert changed.size >= 3  # the penalty moves some of this row's logits

    picks, reference_picks = [], []
    for seed in range(40):
        sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}), engine.n_vocab, history=prompted)
        picks.append(sampler.sample(engine.ctx, -1))
        sampler.close()
        chain = reference_chain(params, engine.n_vocab, prompted, seed)
        reference_picks.append(C.llama_sampler_sample(chain, engine.ctx, -1))
        C.llama_sampler_free(chain)
    assert picks == reference_picks
    assert len(set(picks)) > 1  # a distribution was sampled, not one token
    np.testing.assert_array_equal(engine.logits(-1), before)  # the row is as llama.cpp wrote it

    sampler = Sampler(params, engine.n_vocab, history=prompted)
    ids, p = sampler.candidates(engine.ctx, -1)
    sampler.close()
    z = expected[ids].astype(np.float64)
    np.testing.assert_allclose(p, np.exp(z - z.max()) / np.exp(z - z.max()).sum(), rtol=1e-6)
    np.testing.assert_array_equal(engine.logits(-1), before)


def test_greedy_with_a_penalty_is_the_argmax_of_the_penalized_row(engine: Engine, prompted: list[int]):
    params = SamplingParams(temperature=0.0, repeat_penalty=3.0, repeat_last_n=64)
    row = engine.logits(-1)
    history = [*prompted, int(row.argmax())]  # the best token was just said
    expected = int(penalized_logits(params, row, history).argmax())
    assert expected != int(row.argmax())  # a penalty this strong changes the pick
    sampler = Sampler(params, engine.n_vocab, history=history)
    assert sampler.sample(engine.ctx, -1) == expected
    sampler.close()


def test_the_window_forgets_a_token_after_repeat_last_n_more(engine: Engine, prompted: list[int]):
    params = SamplingParams(temperature=0.0, repeat_penalty=3.0, repeat_last_n=4)
    sampler = Sampler(params, engine.n_vocab, history=prompted)
    best = int(engine.logits(-1).argmax())
    for token in (best, 1, 2, 3):
        sampler.accept(token)
    assert sampler.sample(engine.ctx, -1) != best  # still in the window: penalized
    sampler = Sampler(params, engine.n_vocab, history=prompted)
    for token in (best, 1, 2, 3, 4):
        sampler.accept(token)
    assert sampler.sample(engine.ctx, -1) == best  # pushed out of the window
