"""What a new user meets first: the embedded model's defaults answer everyday questions and stop by
themselves; base models are named as such; the best local chat model is the default; bad options are refused."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import pytest
from support.questions import QUESTIONS

from edgellm.gguf_info import read_info
from edgellm.model_defaults import LLAMA_CPP, resolve_defaults
from edgellm.runtime.engine import Engine
from edgellm.textstream import TextStream

SEED = 0


@pytest.fixture(scope="module")
def gemma3() -> Path:
    from dev_models import dev_model

    return dev_model("gemma3-270m")


def test_embedded_model_defaults_come_from_the_table_with_sources(fresh_engine: Engine):
    defaults = resolve_defaults(fresh_engine.info, {"top_k": 7}, seed=SEED)
    assert defaults.sampling.top_k == 7 and defaults.sources["top_k"] == "flag"
    assert defaults.sampling.temperature == 0.2 and defaults.sampling.min_p == 0.1
    assert defaults.sources["temperature"].startswith("SmolLM2-135M-Instruct (embedded): measured")
    assert defaults.sources["repeat_last_n"] == "llama.cpp" and defaults.sampling.repeat_last_n == LLAMA_CPP["repeat_last_n"]
    assert defaults.system == "You are a helpful assistant."
    assert resolve_defaults(fresh_engine.info, system="Be terse.").system_source == "flag"


@pytest.mark.slow
def test_everyday_questions_end_by_themselves_and_answer_right(fresh_engine: Engine):
    """The embedded model with its defaults and a fixed seed: every reply ends at the end-of-turn token
    (SmolLM2's <|im_end|>) well before the limit, and the factual ones contain the answer."""
    defaults = resolve_defaults(fresh_engine.info, seed=SEED)
    for q in QUESTIONS:
        messages = [{"role": "system", "content": defaults.system}, {"role": "user", "content": q.text}]
        records = list(fresh_engine.chat(messages, sampling=defaults.sampling, max_tokens=256))
        text = "".join(r.text for r in records)
        assert records[-1].finish_reason == "eog", (q.text, text)
        assert "<|im_end|>" not in text and "<|im_start|>" not in text
        if q.answer:
            assert re.search(q.answer, text, re.IGNORECASE), (q.text, text)


def test_a_reply_that_repeats_a_line_is_ended():
    stream = TextStream()
    shown = "".join(stream.push(b"The sea is calm and blue.\n") for _ in range(6))
    assert stream.stopped and stream.reason == "repetition"
    assert shown.count("The sea is calm and blue.") == 4
    short = TextStream()
    for _ in range(6):
        short.push(b"}\n")  # short lines (code, tables) may repeat on purpose
    assert not short.stopped


def test_a_lone_argument_is_the_prompt_for_the_default_model(cli, no_local_models, smollm2: Path):
    result = cli("run", "What is the capital of France?", "-n", "48", "--json", env=no_local_models)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert Path(out["model"]) == smollm2  # the embedded model: nothing else is on this "machine"
    assert out["text"].strip() and out["finish"] in ("end of turn", "token limit")
    assert out["sampling"]["temperature"]["value"] == 0.2
    assert out["sampling"]["system"]["value"] == "You are a helpful assistant."
    assert out["chat_template"] is True


def with_chat_template(source: Path, out: Path, template: str) -> Path:
    """A copy of a GGUF with a chat template added: all keys and tensors as they are."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(out, arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    writer.add_chat_template(template)
    for t in reader.tensors:  # as gguf-py's gguf_new_metadata.py copies them
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    return out


def test_models_list_marks_base_models_and_run_says_so(cli, no_local_models, gemma3: Path):
    models = Path(no_local_models["EDGELLM_MODELS"])
    (models / gemma3.name).symlink_to(gemma3)
    listed = {m["name"]: m for m in json.loads(cli("models", "--json", env=no_local_models).stdout)}
    assert listed["smollm2-135m"]["kind"] == "chat" and listed["gemma3-270m"]["kind"] == "base"

    result = cli("run", str(gemma3), "What is the capital of France?", "--temp", "0", "-n", "128", "--json",
                 env=no_local_models)
    assert result.returncode == 0, result.stderr
    assert "no chat template (a base model)" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    out = json.loads(result.stdout)
    assert out["chat_template"] is False
    # the fallback ChatML's markers, written as plain text by a model that never saw them, end the reply
    assert out["finish_reason"] == "stop" and "<|im_" not in out["text"]


def test_the_default_is_the_best_chat_model_on_the_machine(cli, tmp_path: Path, no_local_models, gemma3: Path):
    models = Path(no_local_models["EDGELLM_MODELS"])
    (models / gemma3.name).symlink_to(gemma3)  # larger than SmolLM2 but a base model: not a default
    first = json.loads(cli("run", "Hi", "-n", "4", "--json", env=no_local_models).stdout)
    assert Path(first["model"]).parent != models
    chat = with_chat_template(gemma3, models / "gemma-chat.gguf", read_info(gemma3).chat_template or
                              "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                              "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    second = json.loads(cli("run", "Hi", "-n", "4", "--json", env=no_local_models).stdout)
    assert Path(second["model"]) == chat


@pytest.mark.parametrize(("args", "message"), [
    (["--temp", "-1"], "--temp must be at least 0.0"),
    (["--top-p", "7"], "--top-p must be above 0.0 and at most 1.0"),
    (["-n", "-5"], "--max-tokens must be at least 1"),
    (["--min-p", "2"], "--min-p must be at least 0.0 and at most 1.0"),
])
def test_out_of_range_options_are_refused(cli, args: list[str], message: str):
    result = cli("run", "smollm2-135m", "hi", *args)
    assert result.returncode == 1 and result.stderr.strip() == f"edgellm: {message} (got {args[1]})"
