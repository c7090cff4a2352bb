"""The engine on the real SmolLM2-135M model: determinism, template, stops, KV reuse, streaming text."""

import ctypes

import llama_cpp as C
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import SamplingParams
from edgellm.textstream import TextStream

GREEDY = SamplingParams.greedy_params()
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "List three fruits."}]


def text_of(records) -> str:
    return "".join(r.text for r in records)


def test_greedy_is_deterministic(fresh_engine: Engine):
    first = list(fresh_engine.chat(MESSAGES, sampling=GREEDY, max_tokens=40))
    fresh_engine.reset()
    second = list(fresh_engine.chat(MESSAGES, sampling=GREEDY, max_tokens=40))
    assert [r.token for r in first] == [r.token for r in second]
    assert text_of(first).strip()


def test_seeded_sampling_repeats_and_seeds_differ(fresh_engine: Engine):
    def sample(seed: int) -> list[int | None]:
        fresh_engine.reset()
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=seed)
        return [r.token for r in fresh_engine.chat(MESSAGES, sampling=params, max_tokens=24,
                                                   ignore_eog=True)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_chat_template_matches_llama_cpp(engine: Engine):
    """Our sandboxed jinja2 rendering of the GGUF's template equals llama.cpp's own formatter."""
    rendered = engine.render_chat(MESSAGES)
    items = (C.llama_chat_message * len(MESSAGES))(
        *[C.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in MESSAGES])
    buf = ctypes.create_string_buffer(4096)
    template = C.llama_model_chat_template(engine.weights.ptr, None)
    n = C.llama_chat_apply_template(template, items, len(MESSAGES), True, buf, len(buf))
    assert rendered == buf.raw[:n].decode()
    assert rendered.endswith("<|im_start|>assistant\n")
    tokens = engine.chat_tokens(MESSAGES)
    assert tokens[0] == engine.tokenize("<|im_start|>", add_special=False)[0]  # parsed as one special token


def test_sandbox_blocks_template_escapes():
    from edgellm import chat_template

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(EdgeLLMError, match="chat template failed"):
        chat_template.render(evil, [{"role": "user", "content": "x"}])


def test_stop_string_ends_generation(fresh_engine: Engine):
    full = text_of(fresh_engine.chat(MESSAGES, sampling=GREEDY, max_tokens=40))
    words = full.split()
    assert len(words) >= 4, full
    stop = words[3]
    fresh_engine.reset()
    records = list(fresh_engine.chat(MESSAGES, sampling=GREEDY, max_tokens=40, stop=[stop]))
    assert records[-1].finish_reason == "stop"
    assert text_of(records) == full[:full.index(stop)]


def test_max_tokens_gives_length(fresh_engine: Engine):
    records = list(fresh_engine.chat(MESSAGES, sampling=GREEDY, max_tokens=5, ignore_eog=True))
    assert records[-1].finish_reason == "length"
    assert records[-1].stats.generated_tokens == 5


def test_eog_ends_generation(fresh_engine: Engine):
    records = list(fresh_engine.chat(MESSAGES, sampling=GREEDY, max_tokens=400))
    assert records[-1].finish_reason == "eog"
    assert records[-1].stats.generated_tokens < 400


def test_second_chat_turn_prefills_only_new_tokens(fresh_engine: Engine):
    turn1 = list(fresh_engine.chat(MESSAGES, sampling=GREEDY, max_tokens=40))
    assert turn1[-1].stats.prefilled_tokens == turn1[-1].stats.prompt_tokens
    history = [*MESSAGES, {"role": "assistant", "content": text_of(turn1)},
               {"role": "user", "content": "And three vegetables?"}]
    prompt = fresh_engine.chat_tokens(history)
    cached = list(fresh_engine.kv_tokens)
    common = next(i for i, (a, b) in enumerate(zip([*cached, -1], prompt, strict=False)) if a != b)
    turn2 = list(fresh_engine.generate(prompt, sampling=GREEDY, max_tokens=20))
    stats = turn2[-1].stats
    assert stats.prompt_tokens == len(prompt)
    assert stats.prefilled_tokens == len(prompt) - common
    assert stats.reused_tokens == common > len(fresh_engine.chat_tokens(MESSAGES)) - 2
    assert fresh_engine.kv_tokens[:len(prompt)] == prompt


def test_same_prompt_again_decodes_one_token(fresh_engine: Engine):
    prompt = fresh_engine.chat_tokens(MESSAGES)
    list(fresh_engine.generate(prompt, sampling=GREEDY, max_tokens=3))
    again = list(fresh_engine.generate(prompt, sampling=GREEDY, max_tokens=3))
    assert again[-1].stats.prefilled_tokens == 1


def test_emoji_and_cjk_stream_intact(fresh_engine: Engine):
    text = "🙂你好世界\n" * 4
    prompt = fresh_engine.tokenize(text, add_special=False)
    # tokens that split characters: the tokenizer cuts these into bytes
    assert any(len(fresh_engine.token_bytes(t).decode("utf-8", "ignore")) == 0 for t in prompt)
    records = list(fresh_engine.generate(prompt, sampling=GREEDY, max_tokens=24, ignore_eog=True))
    pieces = [r.text for r in records]
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some tokens ended mid-character and showed nothing yet
    assert "你好" in "".join(pieces)


def test_token_bytes_through_textstream_rebuild_the_text(engine: Engine):
    text = "def f(x):\n    return x  # ünïcödé ✓ 🙂 你好\n\t\ttabs   spaces"
    stream = TextStream()
    out = "".join(stream.push(engine.token_bytes(t)) for t in engine.tokenize(text, add_special=False))
    assert out + stream.flush() == text


def test_context_larger_than_model_is_refused(smollm2):
    with pytest.raises(EdgeLLMError, match="training context"):
        Engine(smollm2, LoadOptions(n_ctx=100_000))


def test_prompt_longer_than_context_is_refused(smollm2):
    with Engine(smollm2, LoadOptions(n_ctx=64)) as small:  # noqa: SIM117 (inner uses small)
        # llama.cpp pads the context up (to 256 here); the check uses the real size
        with pytest.raises(EdgeLLMError, match=f"context holds {small.n_ctx}"):
            list(small.generate(small.tokenize("word " * (small.n_ctx + 10))))


def test_generation_stops_when_context_is_full(smollm2):
    with Engine(smollm2, LoadOptions(n_ctx=48)) as small:
        prompt = small.tokenize("Once upon a time")
        records = list(small.generate(prompt, sampling=GREEDY, max_tokens=500, ignore_eog=True))
        assert records[-1].finish_reason == "context"  # the status line says "context full", not "token limit"
        assert len(small.kv_tokens) == small.n_ctx


@pytest.mark.parametrize(("source", "why"), [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe|not safely|attribute"),
    ("{{ cycler.__init__.__globals__ }}", "unsafe|not safely|attribute|undefined"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took over"),
    ("{{ 'a' * 1000000000 }}", "builds a value"),
    ("{% for i in range(100000) %}{{ 'x' * 90 }}{% endfor %}", "passed"),
    ("{{ 10 ** 100000000 }}", "huge power"),
])
def test_hostile_templates_fail_cleanly_within_limits(source: str, why: str):
    import re
    import time

    from edgellm import chat_template

    t0 = time.monotonic()
    with pytest.raises(EdgeLLMError, match="chat template failed") as failed:
        chat_template.render(source, [{"role": "user", "content": "x"}])
    assert re.search(why, str(failed.value)), failed.value
    assert time.monotonic() - t0 < chat_template.RENDER_SECONDS + 1.0
