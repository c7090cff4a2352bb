"""Speculative decoding on the real SmolLM2: lossless greedy and sampling, KV rollback, the policy."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import llama_cpp as C
import numpy as np
import pytest

from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import Sampler, SamplingParams
from edgellm.speculative.costs import CostCurve, load_or_measure
from edgellm.speculative.drafters import Combined, DraftModel, EditAwareLookup, PromptLookup
from edgellm.speculative.policy import Policy
from edgellm.speculative.setup import Speculator
from tests.support.near_tie import NEAR_TIE, assert_same_or_near_tie

GREEDY = SamplingParams.greedy_params()
CODE = '''def area(width, height):
    return width * height


def perimeter(width, height):
    return 2 * (width + height)


def describe(width, height):
    return "rectangle %d x %d" % (width, height)
'''
PROMPTS = {
    "rename": f"Rename width to w and height to h. Reply with the code only.\n\n{CODE}",
    "copy": f"Repeat this code exactly.\n\n{CODE}",
    "new": "Write a Python function that reverses a string.",
}


def plain_tokens(engine: Engine, prompt: list[int], n: int) -> list[int]:
    engine.reset()
    return [r.token for r in engine.generate(prompt, GREEDY, max_tokens=n) if r.token is not None]


@pytest.fixture(scope="module")
def curve(engine: Engine) -> CostCurve:
    return load_or_measure(engine)


@pytest.mark.parametrize("name", list(PROMPTS))
@pytest.mark.parametrize("drafter", ["lookup", "edit"])
def test_greedy_lookup_is_lossless(engine: Engine, curve: CostCurve, name: str, drafter: str):
    prompt = engine.chat_tokens([{"role": "user", "content": PROMPTS[name]}])
    plain = plain_tokens(engine, prompt, 96)
    d = PromptLookup() if drafter == "lookup" else EditAwareLookup()
    speculator = Speculator(d, Policy(curve, fixed=8))
    engine.reset()
    records = list(engine.generate(prompt, GREEDY, max_tokens=96, speculator=speculator))
    spec = [r.token for r in records if r.token is not None]
    assert_same_or_near_tie(engine, prompt, plain, spec)
    stats = records[-1].stats
    assert stats.generated_tokens == len(spec)
    assert sum(r.from_draft for r in records) == stats.accepted_tokens <= stats.drafted_tokens
    assert stats.drafted_tokens <= 8 * stats.draft_steps
    if name == "copy":
        assert stats.accepted_tokens > 20  # copying code: the lookup drafts are mostly right


def test_draft_model_is_lossless_and_rolls_back(engine: Engine, curve: CostCurve, smollm2: Path):
    with Engine(smollm2, LoadOptions(n_ctx=2048, n_threads=2)) as draft_engine:
        speculator = Speculator(Combined(DraftModel(draft_engine)), Policy(curve, fixed=4), draft_engine)
        for name in ("new", "rename"):
            prompt = engine.chat_tokens([{"role": "user", "content": PROMPTS[name]}])
            plain = plain_tokens(engine, prompt, 64)
            engine.reset()
            records = list(engine.generate(prompt, GREEDY, max_tokens=64, speculator=speculator,
                                           ignore_eog=True))
            spec = [r.token for r in records if r.token is not None]
            assert_same_or_near_tie(engine, prompt, plain[:len(spec)], spec[:len(plain)])
            stats = records[-1].stats
            assert stats.accepted_tokens >= stats.drafted_tokens // 2  # a model drafting for itself
            # the KV cache holds exactly the accepted text (the last token decoded or not yet)
            assert engine.kv_tokens in (prompt + spec, prompt + spec[:-1])
            pos_max = C.llama_memory_seq_pos_max(engine.memory, 0)
            assert pos_max == len(engine.kv_tokens) - 1
            # the draft model's cache holds a prefix of the same text
            held = draft_engine.kv_tokens
            assert held == (prompt + spec)[:len(held)]
            assert C.llama_memory_seq_pos_max(draft_engine.memory, 0) == len(held) - 1


def test_kv_after_speculation_continues_like_plain(engine: Engine, curve: CostCurve):
    """After a speculative turn, the next turn reuses the cache and gives plain decoding's tokens."""
    prompt = engine.chat_tokens([{"role": "user", "content": PROMPTS["copy"]}])
    speculator = Speculator(EditAwareLookup(), Policy(curve, fixed=8))
    engine.reset()
    first = [r.token for r in engine.generate(prompt, GREEDY, max_tokens=40, speculator=speculator)]
    context = prompt + [t for t in first if t is not None]
    reused = list(engine.generate(context, GREEDY, max_tokens=16))
    assert reused[-1].stats.prefilled_tokens <= 2
    fresh = plain_tokens(engine, context, 16)
    assert_same_or_near_tie(engine, context, fresh, [r.token for r in reused if r.token is not None])


def target_distribution(engine: Engine, params: SamplingParams) -> np.ndarray:
    """The chain's candidates after its filters, as a vector over the vocabulary."""
    sampler = Sampler(params, engine.n_vocab)
    ids, probs = sampler.candidates(engine.ctx, -1)
    sampler.close()
    p = np.zeros(engine.n_vocab)
    p[ids] = probs
    return p


def test_rejection_sampling_keeps_the_target_distribution(engine: Engine):
    params = SamplingParams(temperature=1.0, top_k=20, top_p=1.0, min_p=0.0, seed=1)
    engine.reset()
    engine.prefill(engine.chat_tokens([{"role": "user", "content": "Name an animal."}]))
    p = target_distribution(engine, params)
    support = np.flatnonzero(p)
    assert len(support) == 20  # top-k ran in llama.cpp's sampler
    draft = int(support[np.argsort(p[support])][len(support) // 2])  # a middling candidate
    sampler = Sampler(params, engine.n_vocab)
    n = 20000
    counts = np.zeros_like(p)
    for _ in range(n):
        _, token = sampler.verify(engine.ctx, -1, draft)
        counts[token] += 1
    sampler.close()
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert tv < 0.03, f"total variation {tv:.3f} between speculative samples and the target"
    assert counts[draft] / n == pytest.approx(p[draft], abs=0.015)


def test_candidates_are_what_the_native_chain_samples_from(engine: Engine):
    params = SamplingParams(temperature=0.8, top_k=30, top_p=0.9, min_p=0.02)
    engine.reset()
    engine.prefill(engine.chat_tokens([{"role": "user", "content": "Pick a color."}]))
    p = target_distribution(engine, params)
    n = 3000
    counts = np.zeros_like(p)
    for seed in range(n):
        sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}), engine.n_vocab)
        counts[sampler.sample(engine.ctx, -1)] += 1
        sampler.close()
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(p))
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert tv < 0.06, f"total variation {tv:.3f} between llama.cpp's sampler and Sampler.candidates"


def test_under_a_grammar_candidates_are_what_sample_picks(engine: Engine):
    """The grammar is asked about the chain's pick first and masks the row only when it refuses it (llama.cpp's
    way): the candidates are that procedure's mixture, so verification keeps plain sampling's distribution."""
    gbnf = 'root ::= ("Blue" | "Green" | " Blue" | " Green") [^\\x00]*'
    params = SamplingParams(temperature=1.0, top_k=30, top_p=1.0, min_p=0.0, grammar=gbnf)
    engine.reset()
    engine.prefill(engine.chat_tokens([{"role": "user", "content": "Pick a color."}]))
    sampler = Sampler(params, engine.n_vocab, vocab=engine.weights.vocab)
    ids, probs = sampler.candidates(engine.ctx, -1)
    plain, _ = Sampler(replace(params, grammar=None), engine.n_vocab).candidates(engine.ctx, -1)
    sampler.close()
    assert set(plain.tolist()) - set(ids.tolist())  # the grammar refused some of the chain's own candidates
    p = np.zeros(engine.n_vocab)
    p[ids] = probs
    n = 3000
    counts = np.zeros_like(p)
    for seed in range(n):
        sampler = Sampler(replace(params, seed=seed), engine.n_vocab, vocab=engine.weights.vocab)
        counts[sampler.sample(engine.ctx, -1)] += 1
        sampler.close()
    assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(p))
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert tv < 0.06, f"total variation {tv:.3f} between sampling under a grammar and Sampler.candidates"


def test_sampling_through_speculation_runs_with_a_seed(engine: Engine, curve: CostCurve):
    params = SamplingParams(temperature=0.7, seed=3)
    prompt = engine.chat_tokens([{"role": "user", "content": PROMPTS["copy"]}])
    runs = []
    for _ in range(2):
        engine.reset()
        speculator = Speculator(EditAwareLookup(), Policy(curve, fixed=6))
        runs.append([r.token for r in engine.generate(prompt, params, max_tokens=48, speculator=speculator)])
    assert runs[0] == runs[1]  # same seed, same drafts: the same sample


def synthetic_curve() -> CostCurve:
    # the 1.5B on a 2-core EPYC: verifying n tokens costs c(n) single decodes
    rel = {1: 1.0, 2: 1.64, 3: 2.2, 4: 2.71, 6: 4.5, 8: 6.26, 12: 6.9, 16: 7.49, 24: 10.0, 32: 12.36}
    return CostCurve({n: 0.033 * c for n, c in rel.items()})


def test_policy_turns_lookup_on_when_it_pays_and_off_when_not():
    policy = Policy(synthetic_curve())
    assert policy.choose("edit:new", 32) == 0  # nothing known: decode plainly
    for entry in range(20):  # copying: every proposal right all the way
        policy.update("edit:new", 32, 32, entry, final=True)
    k = policy.choose("edit:new", 32)
    assert k >= 15 and policy.gain("edit:new", k) > 2.0
    for entry in range(20, 80):  # the text stops repeating: first tokens wrong
        policy.update("edit:new", 32, 0, entry, final=True)
    assert policy.choose("edit:new", 32) == 0
    for entry in range(80, 140):  # and starts again
        policy.update("edit:new", 32, 32, entry, final=True)
    assert policy.choose("edit:new", 32) > 0


def test_verified_drafts_that_fall_short_scale_the_expectation_down_then_are_forgiven():
    policy = Policy(synthetic_curve())
    for entry in range(20):  # the scores say: long runs of right tokens
        policy.update("edit:run", 32, 32, entry, final=True)
    k = policy.choose("edit:run", 32)
    before = policy.gain("edit:run", k)
    assert k > 0 and before > 1.5
    expected = policy.stats("edit:run").expected_accepted(k)
    for _ in range(6):  # but every verified draft is cut at once (the edits come in bursts)
        policy.settle("edit:run", expected, 0)
    assert policy.stats("edit:run").calibration < 0.3
    assert policy.gain("edit:run", k) < before and policy.choose("edit:run", 32) == 0  # off
    for _ in range(200):  # off for a while, nothing verified: the shortfall fades and it comes back on
        policy.choose("edit:run", 32)
    assert policy.choose("edit:run", 32) > 0
    for _ in range(20):  # drafts that deliver more than expected never raise it above the model
        policy.settle("edit:run", expected, 32)
    assert policy.stats("edit:run").calibration == 1.0


def test_policy_keeps_an_expensive_draft_model_off():
    policy = Policy(synthetic_curve())
    policy.observe_draft_cost("draft:new", 0.57 * 0.033)  # the 0.5B drafting for the 1.5B
    for entry in range(30):
        policy.update("draft:new", 4, 4, entry, final=True)  # even if it were always right
    assert not policy.could_pay("draft:new")  # even 95% right, 0.57 per token cannot pay here
    assert [policy.choose("draft:new", 8) for _ in range(64)] == [0] * 64  # off, not even probed


def test_policy_probes_a_cheap_draft_model_that_is_off():
    policy = Policy(synthetic_curve())
    policy.observe_draft_cost("draft:new", 0.05 * 0.033)  # a GPU-like machine: drafts nearly free
    assert policy.could_pay("draft:new")
    for entry in range(40):
        policy.update("draft:new", 4, 0, entry, final=True)  # wrong so far: off...
    choices = [policy.choose("draft:new", 8) for _ in range(64)]
    assert choices.count(0) >= 60 and 0 < max(choices) <= 2  # ...but re-tried with short probes


def test_cost_curve_is_measured_once_and_cached(engine: Engine, curve: CostCurve):
    assert sorted(curve.seconds) == list(range(1, 34))  # every batch a draft of up to 32 can make
    assert all(curve.cost(n) > 0.5 for n in (2, 4, 16, 32))
    from edgellm.speculative.costs import _cache_path

    assert _cache_path(engine).exists()
    assert load_or_measure(engine).seconds == load_or_measure(engine).seconds  # read back, not re-measured


def test_greedy_speculation_applies_the_repeat_penalty_as_plain_decoding(engine: Engine, curve: CostCurve):
    penalized = SamplingParams(temperature=0.0, repeat_penalty=1.3)
    prompt = engine.chat_tokens([{"role": "user", "content": PROMPTS["copy"]}])
    engine.reset()
    plain = [r.token for r in engine.generate(prompt, penalized, max_tokens=64) if r.token is not None]
    assert plain != plain_tokens(engine, prompt, 64)[:len(plain)]  # the penalty changes this text
    engine.reset()
    records = list(engine.generate(prompt, penalized, max_tokens=64,
                                   speculator=Speculator(EditAwareLookup(), Policy(curve, fixed=8))))
    spec = [r.token for r in records if r.token is not None]
    assert records[-1].stats.drafted_tokens > 0
    diverge = next((i for i, (a, b) in enumerate(zip(plain, spec, strict=False)) if a != b), None)
    if diverge is not None:  # only at a near-tie of the penalized logits
        engine.reset()
        engine.prefill(prompt + plain[:diverge])
        logits = penalize(engine.logits(-1), (prompt + plain[:diverge])[-64:], 1.3)
        first, second = np.argsort(logits)[::-1][:2]
        assert spec[diverge] == second and logits[first] - logits[second] < NEAR_TIE


def penalize(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty, written out: a seen token's logit divided by it when positive."""
    out = logits.copy()
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    out[ids] = np.where(out[ids] <= 0, out[ids] * penalty, out[ids] / penalty)
    return out


def test_first_use_starts_from_a_pessimistic_prior_and_keeps_what_it_learned(engine: Engine,
                                                                             monkeypatch, tmp_path: Path):
    import time

    from edgellm.speculative.costs import load_or_measure, prior
    from edgellm.speculative.setup import make_speculator

    measured = load_or_measure(engine)  # as stored: the fixture's copy drifts with other tests' batch timings
    monkeypatch.setenv("EDGELLM_CACHE", str(tmp_path))  # no cached curve
    t0 = time.perf_counter()
    speculator = make_speculator(engine, "edit")
    assert time.perf_counter() - t0 < 1.0 and speculator is not None and speculator.policy.curve.prior
    guess = prior(engine)
    assert all(guess.cost(n) >= 0.9 * measured.cost(n) for n in range(2, 34))  # never cheaper than measured
    engine.reset()
    prompt = engine.chat_tokens([{"role": "user", "content": PROMPTS["new"]}])
    list(engine.generate(prompt, GREEDY, max_tokens=40, speculator=speculator))
    speculator.close()
    assert speculator.policy.curve.observed >= 16
    (kept,) = tmp_path.glob("costs/*.json")
    assert json.loads(kept.read_text())["refined_prior"] is True


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)


def test_cli_draft_ngram_gives_the_plain_text():
    args = ("run", "smollm2-135m", PROMPTS["copy"], "--temp", "0", "--repeat-penalty", "1", "-n", "48", "--json")
    plain = json.loads(run_cli(*args, "--draft", "off").stdout)
    spec = json.loads(run_cli(*args, "--draft", "ngram").stdout)
    assert spec["stats"]["generated_tokens"] == plain["stats"]["generated_tokens"]
    # a verification batch may differ from a single decode in a logit's last bits: the texts agree up to
    # a near-tie, on most of their length
    agree = next((i for i, (x, y) in enumerate(zip(spec["text"], plain["text"], strict=False)) if x != y),
                 len(plain["text"]))
    assert agree >= 0.75 * len(plain["text"]), (spec["text"], plain["text"])
    assert spec["stats"]["drafted_tokens"] > 0 and plain["stats"]["drafted_tokens"] == 0


def test_incompatible_draft_model_is_refused(tmp_path: Path, smollm2: Path):
    # the same model with one vocabulary entry changed: it loads, but its tokens mean other text
    data = smollm2.read_bytes()
    at = data.index(b"<|endoftext|>")
    other = tmp_path / "other-vocab.gguf"
    other.write_bytes(data[:at] + b"<|endoftexx|>" + data[at + 13:])
    result = run_cli("run", "smollm2-135m", "hi", "--draft", str(other))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not compatible" in lines[0], result.stderr


def test_token_tree_is_lossless_and_leaves_only_the_accepted_path(smollm2: Path, monkeypatch):
    from edgellm.speculative import tree

    trees = []
    real_verify = tree.verify

    def counting_verify(engine, sampler, pending, nodes, n_branches):
        trees.append(n_branches)
        return real_verify(engine, sampler, pending, nodes, n_branches)

    monkeypatch.setattr(tree, "verify", counting_verify)
    options = LoadOptions(n_ctx=2048, n_threads=2, n_seq_max=4, kv_unified=True)
    with Engine(smollm2, options) as engine:
        text = "Repeat exactly: one two three, one two four, one two five, one two six, one two seven"
        prompt = engine.chat_tokens([{"role": "user", "content": text}])
        plain = plain_tokens(engine, prompt, 48)
        speculator = Speculator(EditAwareLookup(), Policy(load_or_measure(engine), fixed=6), tree_width=3)
        engine.reset()
        records = list(engine.generate(prompt, GREEDY, max_tokens=48, speculator=speculator))
        spec = [r.token for r in records if r.token is not None]
        assert_same_or_near_tie(engine, prompt, plain, spec)
        assert trees and max(trees) >= 2  # some steps verified a real tree (two or more branches)
        assert engine.kv_tokens == (prompt + spec)[:len(engine.kv_tokens)]
        assert len(engine.kv_tokens) >= len(prompt + spec) - 1
        assert C.llama_memory_seq_pos_max(engine.memory, 0) == len(engine.kv_tokens) - 1
        for branch in (1, 2, 3):
            assert C.llama_memory_seq_pos_max(engine.memory, branch) == -1  # branches dropped


def test_tree_needs_a_unified_cache(engine: Engine):
    from edgellm.errors import EdgeLLMError
    from edgellm.speculative.setup import make_speculator

    with pytest.raises(EdgeLLMError, match="unified KV cache"):
        make_speculator(engine, "tree")


def test_memory_pressure_drops_the_draft_model_mid_reply_and_loses_nothing(engine: Engine, curve: CostCurve,
                                                                          smollm2: Path):
    from edgellm.memory.pressure import MemoryWatch
    from edgellm.speculative.setup import make_speculator

    prompt = engine.chat_tokens([{"role": "user", "content": PROMPTS["copy"]}])
    plain = plain_tokens(engine, prompt, 64)
    readings = iter([1 << 40] * 10 + [0] * 1000)  # MemAvailable drops after ten tokens
    speculator = make_speculator(engine, str(smollm2), watch=MemoryWatch(1 << 30, lambda: next(readings), 0.0))
    assert speculator is not None and speculator.draft_engine is not None
    engine.reset()
    records = list(engine.generate(prompt, GREEDY, max_tokens=64, speculator=speculator))
    events = [(i, r.event) for i, r in enumerate(records) if r.event]
    assert len(events) == 1 and events[0][1] == f"memory low: draft model {engine.info.name} unloaded"
    assert 5 < events[0][0] < len(records) - 1  # in the middle of the reply
    assert speculator.draft_engine is None and records[-1].finish_reason == "length"
    assert_same_or_near_tie(engine, prompt, plain, [r.token for r in records if r.token is not None])
    speculator.close()
