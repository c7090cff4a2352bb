"""The request scheduler: sessions batched in one context give the text each gives alone; swapped-out
conversations come back without a prefill; KV files from another model or other settings are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.memory.scheduler import Scheduler
from edgellm.runtime import kvfile
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import SamplingParams
from tests.support.near_tie import assert_same_or_near_tie

GREEDY = SamplingParams.greedy_params()
PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):",
           "Once upon a time, in a small village,"]


def tokens_of(records) -> list[int]:
    return [r.token for r in records if r.token is not None]


def alone(engine: Engine, prompt: str | list[int], n: int = 32, **kwargs) -> list[int]:
    """The greedy tokens of `prompt` decoded alone on the single-sequence engine."""
    engine.reset()
    ids = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    return tokens_of(engine.generate(ids, GREEDY, max_tokens=n, **{"ignore_eog": True, **kwargs}))


def check_like_alone(engine: Engine, prompt: str | list[int], want: list[int], request) -> None:
    """Batched decodes may differ from a single one in the last bits of a logit (another kernel order): the
    tokens agree, or part where plain decoding's top two logits nearly tie."""
    ids = engine.tokenize(prompt) if isinstance(prompt, str) else prompt
    assert_same_or_near_tie(engine, ids, want, tokens_of(request.records))


@pytest.fixture(scope="module")
def batched(smollm2: Path):
    with Engine(smollm2, LoadOptions(n_ctx=4 * 512, n_seq_max=4, n_outputs=4, n_threads=2)) as e:
        yield e


def test_sessions_batched_write_what_each_writes_alone(engine, batched, tmp_path):
    expected = [alone(engine, p) for p in PROMPTS]
    scheduler = Scheduler(batched, tmp_path)
    requests = [scheduler.submit(batched.tokenize(p), GREEDY, 32, ignore_eog=True) for p in PROMPTS]
    scheduler.run()
    assert scheduler.steps <= 32 + 1  # one llama_decode per step carries every session
    for prompt, want, r in zip(PROMPTS, expected, requests, strict=True):
        assert r.finish_reason == "length" and r.stats.generated_tokens == 32
        check_like_alone(engine, prompt, want, r)
    assert sum(tokens_of(r.records) == want for want, r in zip(expected, requests, strict=True)) >= 3


def test_sessions_out_of_slot_order_still_decode_as_one_reused_graph(batched, tmp_path):
    """llama.cpp splits a batch whose sequences are out of order into one micro-batch per sequence, each with a
    graph built anew; the scheduler lays every step out by slot, however the requests came in."""
    import llama_cpp as C

    scheduler = Scheduler(batched, tmp_path, policy=None)
    requests = [scheduler.submit(batched.tokenize(p), GREEDY, 16, ignore_eog=True) for p in PROMPTS]
    scheduler.step()  # the prompts, one step
    scheduler.active.reverse()  # as when later requests took lower slots
    assert [r.slot.kv.seq_id for r in scheduler.active] == [3, 2, 1, 0]
    reused = C.llama_perf_context(batched.ctx).n_reused
    steps = scheduler.steps
    scheduler.run()
    assert all(r.stats.generated_tokens == 16 for r in requests)
    assert C.llama_perf_context(batched.ctx).n_reused - reused >= scheduler.steps - steps - 1


def test_a_new_session_joins_running_steps(engine, batched, tmp_path):
    expected = [alone(engine, p, 24) for p in PROMPTS[:3]]
    batched.reset()
    scheduler = Scheduler(batched, tmp_path)
    first = [scheduler.submit(batched.tokenize(p), GREEDY, 24, ignore_eog=True) for p in PROMPTS[:2]]
    for _ in range(5):
        scheduler.step()
    late = scheduler.submit(batched.tokenize(PROMPTS[2]), GREEDY, 24, ignore_eog=True)
    scheduler.step()  # its prompt is decoded in the same batch as the next tokens of the first two
    assert late.records and all(len(r.records) == 6 for r in first)
    scheduler.run()
    for prompt, want, r in zip(PROMPTS[:3], expected, [*first, late], strict=True):
        check_like_alone(engine, prompt, want, r)


def conversation(e: Engine, turns: list[tuple[str, str]], question: str) -> list[int]:
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return e.chat_tokens([*messages, {"role": "user", "content": question}])


def test_a_swapped_out_session_resumes_without_prefill(smollm2, tmp_path):
    with Engine(smollm2, LoadOptions(n_ctx=2 * 1024, n_seq_max=2, n_outputs=2, n_threads=2)) as e:
        scheduler = Scheduler(e, tmp_path)
        story = ("Apples grow in orchards in the north; bananas grow on tall plants where it is hot; "
                 "cherries are small and red and grow on trees in spring. ") * 6
        question = story + "Name the three fruits in this text."
        first = scheduler.submit(conversation(e, [], question), GREEDY, 48, session="a")
        scheduler.run()
        turns = [(question, first.text)]
        for s in ("b", "c"):  # two other sessions take both slots: "a" goes to disk
            scheduler.submit(conversation(e, [], f"Say {s}."), GREEDY, 8, session=s)
        scheduler.run()
        assert scheduler.swaps_out >= 1 and "a" in scheduler.swapped
        prompt = conversation(e, turns, "Which one is red?")
        resumed = scheduler.submit(prompt, GREEDY, 32, session="a")
        scheduler.run()
        assert scheduler.swaps_in == 1 and not list(tmp_path.glob("a-*"))  # restored, file removed
        new_tokens = resumed.stats.prefilled_tokens
        assert new_tokens < 40 and new_tokens < len(prompt) // 4  # only the new turn was decoded
    with Engine(smollm2, LoadOptions(n_ctx=1024, n_threads=2)) as fresh:
        want = alone(fresh, prompt, 32, ignore_eog=False)
        check_like_alone(fresh, prompt, want, resumed)


def test_a_kv_file_from_another_model_or_settings_is_refused(smollm2, tmp_path):
    from tests.dev_models import dev_model

    path = tmp_path / "s.kv"
    with Engine(smollm2, LoadOptions(n_ctx=512, n_threads=2)) as e:
        tokens = e.tokenize("The capital of France is")
        e.decode(tokens)
        kvfile.save(e, 0, tokens, path)
        e.reset()
        assert kvfile.load(e, 0, path, 512) == tokens  # the same engine takes it back
        assert json.loads(path.with_name("s.kv.json").read_text())["n_tokens"] == len(tokens)
    with Engine(smollm2, LoadOptions(n_ctx=512, type_k="q8_0", type_v="q8_0", n_threads=2)) as q8, \
            pytest.raises(EdgeLLMError, match="another type_k, type_v"):
        kvfile.load(q8, 0, path, 512)
    with Engine(dev_model("gemma3-270m"), LoadOptions(n_ctx=512, n_threads=2)) as other, \
            pytest.raises(EdgeLLMError, match="another model"):
        kvfile.load(other, 0, path, 512)
    path.with_name("s.kv.json").unlink()
    with Engine(smollm2, LoadOptions(n_ctx=512, n_threads=2)) as e, pytest.raises(EdgeLLMError, match="no readable note"):
        kvfile.load(e, 0, path, 512)


def test_bench_parallel_reports_aggregate_and_per_session_speed(cli):
    result = cli("bench", "smollm2-135m", "--parallel", "2", "-p", "32", "-g", "16", "-r", "1", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["parallel"] == 2 and len(out["tps"]) == 2 and all(t > 0 for t in out["tps"])
    # batched: one llama_decode per step carries both sessions' tokens (not one decode per token)
    assert out["decode_steps"] <= 16 and out["aggregate_tps"] > 0


def test_memory_pressure_gives_way_in_order_and_loses_no_text(engine, batched, smollm2, tmp_path):
    from edgellm.memory.pressure import MemoryWatch
    from edgellm.speculative.setup import make_speculator

    want = alone(engine, PROMPTS[3], 40)
    batched.reset()
    available = {"bytes": 1 << 40}
    scheduler = Scheduler(batched, tmp_path, MemoryWatch(margin=1 << 30, available=lambda: available["bytes"],
                                                         interval_s=0.0))
    speculator = make_speculator(engine, str(smollm2))  # a draft model beside the target
    assert speculator is not None and speculator.draft_engine is not None
    scheduler.reliefs.append(speculator.drop_draft)
    done = scheduler.submit(batched.tokenize(PROMPTS[0]), GREEDY, 4, session="a")
    scheduler.run()  # "a" is idle now, its KV still in a slot
    running = scheduler.submit(batched.tokenize(PROMPTS[3]), GREEDY, 40, ignore_eog=True, session="b")
    for _ in range(5):
        scheduler.step()
    available["bytes"] = 1 << 20  # the machine runs short
    for _ in range(3):
        scheduler.step()
    events = [r.event for r in running.records if r.event]
    assert events == [f"memory low: draft model {engine.info.name} unloaded",
                      "memory low: 1 idle conversation(s) moved out of memory",
                      "memory low: new sessions refused until memory frees"]
    assert speculator.draft_engine is None and "a" in scheduler.swapped
    with pytest.raises(EdgeLLMError, match="memory is low"):
        scheduler.submit(batched.tokenize("Hello"), GREEDY, 4)
    available["bytes"] = 1 << 40
    scheduler.run()
    assert scheduler.accepting and done.finish_reason
    assert running.finish_reason == "length"
    check_like_alone(engine, PROMPTS[3], want, running)
    scheduler.close()
    speculator.close()


def test_sessions_speculate_in_the_batch_and_write_what_each_writes_alone(engine, smollm2, tmp_path):
    from edgellm.speculative.costs import load_or_measure
    from edgellm.speculative.policy import Policy
    from tests.test_speculative import PROMPTS as SPEC_PROMPTS

    prompts = [engine.chat_tokens([{"role": "user", "content": SPEC_PROMPTS[name]}]) for name in ("copy", "rename")]
    expected = [alone(engine, prompt, 64, ignore_eog=False) for prompt in prompts]
    options = LoadOptions(n_ctx=2 * 1024, n_seq_max=2, n_outputs=2 * 33, n_threads=2)
    with Engine(smollm2, options) as e:
        scheduler = Scheduler(e, tmp_path, policy=Policy(load_or_measure(engine), fixed=4))
        requests = [scheduler.submit(p, GREEDY, 64) for p in prompts]
        scheduler.run()
        assert scheduler.steps < 64  # drafts accepted: fewer steps than tokens
    for prompt, want, r in zip(prompts, expected, requests, strict=True):
        s = r.stats
        assert s.drafted_tokens > 0 and 0 < s.accepted_tokens <= s.drafted_tokens <= 4 * s.draft_steps
        assert sum(rec.from_draft for rec in r.records) == s.accepted_tokens
        check_like_alone(engine, prompt, want, r)


def test_speculation_is_on_where_the_context_has_draft_rows_and_leaves_sequences_it_does_not_pay(
        engine, batched, smollm2, tmp_path):
    from edgellm.speculative import batched as lookups

    assert Scheduler(batched, tmp_path).policy is None  # one logits row per slot: no room for drafts
    prompt = batched.tokenize(PROMPTS[1])
    want = alone(engine, PROMPTS[1], 48)
    options = LoadOptions(n_ctx=2 * 1024, n_seq_max=2, n_outputs=2 * 33, n_threads=2)
    with Engine(smollm2, options) as e:
        scheduler = Scheduler(e, tmp_path)
        assert scheduler.policy is not None and scheduler.policy.fixed is None
        request = scheduler.submit(prompt, GREEDY, 48, ignore_eog=True)
        spec = None
        while not request.done:
            scheduler.step()
            spec = spec or request._spec
            if request._spec is not None:  # the accounting that decides, kept up every step
                assert request._spec.steps <= scheduler.steps and request._spec.bookkeeping_s > 0
        assert spec is not None and spec.steps >= lookups.WARMUP_STEPS
        # a poem has nothing to look up: its lookups cost more than they saved, so it decodes plainly
        assert spec.accepted * scheduler.policy.curve.t1 < spec.bookkeeping_s
        assert request._spec is None and request._sampler is not None  # switched to plain sampling
        assert request.stats.generated_tokens == 48
    check_like_alone(engine, PROMPTS[1], want, request)


def test_cancel_while_queued_prefilling_or_decoding_frees_the_slot(batched, tmp_path):
    small_steps = LoadOptions(n_ctx=4 * 512, n_seq_max=4, n_outputs=4, n_batch=64, n_threads=2)
    with Engine(batched.weights, small_steps) as e:
        _cancel_everywhere(e, tmp_path)


def _cancel_everywhere(batched: Engine, tmp_path: Path) -> None:
    import threading

    scheduler = Scheduler(batched, tmp_path)
    long_prompt = batched.tokenize("The history of the sea, told slowly. " * 30)  # several 64-token steps
    cancels = [threading.Event() for _ in range(5)]
    decoding = scheduler.submit(batched.tokenize(PROMPTS[0]), GREEDY, 64, ignore_eog=True, cancel=cancels[0])
    prefilling = scheduler.submit(long_prompt, GREEDY, 8, cancel=cancels[1])
    others = [scheduler.submit(batched.tokenize(p), GREEDY, 64, ignore_eog=True, cancel=cancels[i])
              for i, p in ((2, PROMPTS[2]), (3, PROMPTS[3]))]
    queued = scheduler.submit(batched.tokenize(PROMPTS[1]), GREEDY, 8, cancel=cancels[4])
    scheduler.step()
    scheduler.step()
    assert queued in scheduler.waiting and prefilling._todo and decoding.records  # each where we want it
    cancels[0].set()
    cancels[1].set()
    cancels[4].set()
    scheduler.step()
    for r in (decoding, prefilling, queued):
        assert r.done and r.finish_reason == "cancelled"
    assert queued.slot is None and not prefilling.stats.generated_tokens
    assert sum(not s.busy for s in scheduler.slots) == 2  # the cancelled ones' slots are free
    after = scheduler.submit(batched.tokenize(PROMPTS[1]), GREEDY, 8, ignore_eog=True)
    scheduler.step()
    assert after.slot is not None and after.records  # the next request found a free slot at once
    for i in (2, 3):
        cancels[i].set()
    scheduler.run()
    assert all(r.done for r in [*others, after])
    scheduler.close()


def test_stop_strings_end_a_batched_reply_and_hide_the_stop(engine, batched, tmp_path):
    want = engine.detokenize(alone(engine, PROMPTS[2], 48))
    stop = want[len(want) // 3:len(want) // 3 + 4]  # a stop string that the reply writes
    assert stop.strip()
    batched.reset()
    scheduler = Scheduler(batched, tmp_path)
    request = scheduler.submit(batched.tokenize(PROMPTS[2]), GREEDY, 48, stop=[stop], ignore_eog=True)
    beside = scheduler.submit(batched.tokenize(PROMPTS[0]), GREEDY, 48, ignore_eog=True)
    scheduler.run()
    assert request.finish_reason == "stop" and stop not in request.text
    assert want.startswith(request.text) and len(request.text) < len(want)
    assert beside.finish_reason == "length" and beside.stats.generated_tokens == 48  # unaffected


def test_temperature_sampling_is_seeded_per_request(batched, tmp_path):
    hot = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    texts = []
    for _ in range(2):
        batched.reset()
        scheduler = Scheduler(batched, tmp_path)
        requests = [scheduler.submit(batched.tokenize(PROMPTS[3]), hot, 32, ignore_eog=True),
                    scheduler.submit(batched.tokenize(PROMPTS[3]), SamplingParams(**{**hot.__dict__, "seed": 8}), 32,
                                     ignore_eog=True)]
        scheduler.run()
        texts.append([r.text for r in requests])
    assert texts[0] == texts[1]  # the same seed gives the same sample, whatever runs beside it
    assert texts[0][0] != texts[0][1]  # another seed, another sample


def test_a_failed_decode_ends_its_step_and_the_others_go_on(engine, batched, tmp_path):
    batched.reset()
    scheduler = Scheduler(batched, tmp_path)
    ok = scheduler.submit(batched.tokenize(PROMPTS[0]), GREEDY, 16, ignore_eog=True)
    scheduler.step()
    scheduler.step()
    broken = scheduler.submit(batched.tokenize(PROMPTS[1]), GREEDY, 16, ignore_eog=True)
    scheduler._admit()
    broken._todo[-1] = batched.n_vocab + 5  # past submit's check: llama_decode itself refuses the batch
    scheduler.step()
    assert broken.done and broken.finish_reason == "error" and "decoding failed" in broken.records[-1].event
    assert ok.done and ok.finish_reason == "error"  # it shared the failed step
    later = scheduler.submit(batched.tokenize(PROMPTS[2]), GREEDY, 16, ignore_eog=True)
    scheduler.run()
    assert later.finish_reason == "length" and later.stats.generated_tokens == 16
    check_like_alone(engine, PROMPTS[2], alone(engine, PROMPTS[2], 16), later)
    import llama_cpp as C

    for slot in scheduler.slots:  # each slot's KV holds exactly the tokens it believes it holds
        assert C.llama_memory_seq_pos_max(batched.memory, slot.kv.seq_id) == len(slot.tokens) - 1
    scheduler.close()
