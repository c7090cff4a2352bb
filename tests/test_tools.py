"""Tool calls: declared tools through the model's own template (or a generic section), replies read back into
OpenAI's `tool_calls` and Ollama's `message.tool_calls`, tool_choice's grammars, and an agent loop's turns.

The readers and the stream's hold-back run on text; the server runs the real Qwen2.5-Coder-0.5B (its template
writes tools) and SmolLM2 (its template does not), driven by the official `openai` and `ollama` clients.
"""

from __future__ import annotations

import json

import jsonschema
import ollama
import openai
import pytest

from edgellm.runtime.grammar import check_grammar
from edgellm.tools.declare import Choice, ToolError, read_choice, read_tools
from edgellm.tools.force import TEXT_GBNF, call_gbnf
from edgellm.tools.parse import parse
from edgellm.tools.prompt import GENERIC, prepare, writes_tools
from edgellm.tools.watch import CallWatch
from tests.support.server import ServerProcess

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "description": "The city name"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a city",
                                            "parameters": WEATHER_PARAMS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The current time in a timezone",
                                         "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                                                        "required": ["tz"]}}}
TOOLS = read_tools([WEATHER, TIME])


# -- reading a reply ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',  # Hermes, Qwen
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # Mistral
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.x
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.x, bare
    '<function=get_weather>{"city": "Paris"}</function>',  # Llama 3.1's custom format
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',  # bare JSON
    '  ```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n',  # fenced
    '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}',  # llama.cpp's generic
    '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',  # arguments as a JSON string
])
def test_every_family_and_the_bare_forms_read_as_one_valid_call(text: str):
    parsed = parse(text, TOOLS)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", {"city": "Paris"})]
    assert parsed.content == ""
    call = parsed.calls[0].openai()
    assert call["id"].startswith("call_") and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_text_around_tagged_calls_is_the_content_and_several_calls_are_kept_in_order():
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>')
    parsed = parse(text, TOOLS)
    assert [c.name for c in parsed.calls] == ["get_weather", "get_time"]
    assert parsed.content == "Let me look."
    assert len({c.id for c in parsed.calls}) == 2


@pytest.mark.parametrize("text", [
    '{"name": "get_weather", "arguments": {}}',  # a required argument missing
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "kelvin"}}',  # not in the enum
    '{"name": "send_mail", "arguments": {"to": "x"}}',  # not a declared tool
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><tool_call>oops</tool_call>',
    '{"answer": 42}',
    "The weather is fine.",
])
def test_a_reply_that_is_not_wholly_valid_calls_stays_text(text: str):
    parsed = parse(text, TOOLS)
    assert parsed.calls == [] and parsed.content == text


def test_the_stream_holds_back_only_what_may_be_a_call():
    watch = CallWatch(TOOLS)
    pieces = ["Let me ", "check <", "b>now</b>. <tool", '_call>\n{"name": "get_time", ', '"arguments": {"tz": "UTC"}}',
              "\n</tool_call>"]
    sent = "".join(watch.feed(p) for p in pieces)
    assert sent == "Let me check <b>now</b>. "
    rest, parsed = watch.finish()
    assert rest == "" and [c.name for c in parsed.calls] == ["get_time"]

    watch = CallWatch(TOOLS)
    assert watch.feed("  ") == "" and watch.feed('{"a"') == "" and watch.feed(": 1}") == ""
    rest, parsed = watch.finish()
    assert rest == '  {"a": 1}' and parsed.calls == []  # not a call: all of it, once

    watch = CallWatch(TOOLS, hold_all=True)
    assert watch.feed("Hello") == ""
    assert watch.finish()[0] == "Hello"


# -- declaring ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("tools", "where"), [
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}],
     "tools[0].function.parameters: invalid schema at #/type"),
    ([WEATHER, {"type": "function", "function": {"name": "g", "parameters": {"properties": {"a": {"minimum": "x"}}}}}],
     "tools[1].function.parameters: invalid schema at #/properties/a/minimum"),
    ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
    ([WEATHER, WEATHER], "declared twice"),
    ([{"type": "retrieval"}], "tools[0].type"),
    (["get_weather"], "tools[0]: a tool is an object"),
])
def test_a_bad_tool_definition_names_its_path(tools: list, where: str):
    with pytest.raises(ToolError, match=None) as e:
        read_tools(tools)
    assert where in str(e.value), str(e.value)


def test_tool_choice_reads_openais_forms():
    assert read_choice(None, TOOLS) == Choice("auto") and read_choice(None, []) == Choice("none")
    assert read_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS) == Choice("function", "get_time")
    for bad in ("always", {"type": "function", "function": {"name": "nope"}}, 3):
        with pytest.raises(ToolError):
            read_choice(bad, TOOLS)
    with pytest.raises(ToolError, match="needs tools"):
        read_choice("required", [])


def test_the_grammars_of_tool_choice_compile_in_llama_cpp():
    for choice in (Choice("required"), Choice("function", "get_time"), Choice("none")):
        gbnf = call_gbnf(TOOLS, choice)
        assert gbnf
        check_grammar(gbnf)
    assert call_gbnf(TOOLS, Choice("none")) == TEXT_GBNF and call_gbnf(TOOLS, Choice("auto")) is None


def test_a_template_without_tools_gets_the_generic_section_and_plain_turns():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "rain", "tool_call_id": "c1", "name": "get_weather"}]
    template_tools = [t.as_template() for t in TOOLS]
    out, tools = prepare("{{ messages }}", messages, template_tools)
    assert tools is None and not writes_tools("{{ messages }}")
    assert out[0]["content"].startswith("Be brief.\n\n" + GENERIC.split("{")[0])
    assert '"name": "get_weather"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'}
    assert out[3] == {"role": "user", "content": "The result of the tool get_weather:\nrain"}
    same, passed = prepare("{% if tools %}{{ tools }}{% endif %}", messages, template_tools)
    assert same is messages and passed == template_tools


# -- the server ---------------------------------------------------------------------------------------------

QWEN, SMOL = "qwen2.5-coder-0.5b", "smollm2-135m"
QUESTION = "What's the weather like in Paris today?"
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from tests.dev_models import dev_model

    dev_model(QWEN)
    tmp = tmp_path_factory.mktemp("serve-tmp")
    with ServerProcess("--model", QWEN, "--model", SMOL, "--parallel", "2", "--ctx", "2048",
                       env={"TMPDIR": str(tmp)}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def valid_weather_call(call) -> dict:
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER_PARAMS)
    return arguments


def test_openai_named_tool_then_its_result_gives_an_answer_that_uses_it(client):
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=QWEN, messages=messages, tools=[WEATHER, TIME], tool_choice=NAMED,
                                       temperature=0, max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert valid_weather_call(call)["city"] == "Paris"
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature": "31 C", "conditions": "sunny"})})
    # "none": an answer from the result (a 0.5B model asked with "auto" calls the tool again)
    r = client.chat.completions.create(model=QWEN, messages=messages, tools=[WEATHER, TIME], tool_choice="none",
                                       temperature=0, max_tokens=60)
    final = r.choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert "31" in final.message.content and "sunny" in final.message.content.lower(), final.message.content


def test_openai_auto_with_a_question_needing_no_tool_gives_text(client):
    r = client.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": "Write a haiku about rivers."}],
                                       tools=[WEATHER], temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length") and not choice.message.tool_calls
    assert choice.message.content and "{" not in choice.message.content


def test_openai_auto_with_a_weather_question_calls_the_tool(client):
    r = client.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": QUESTION}],
                                       tools=[WEATHER, TIME], temperature=0, max_tokens=100)
    assert r.choices[0].finish_reason == "tool_calls"
    assert valid_weather_call(r.choices[0].message.tool_calls[0])["city"] == "Paris"


@pytest.mark.parametrize("model", [QWEN, SMOL])
def test_openai_required_streams_a_valid_call_as_tool_call_deltas(client, model: str):
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Is it raining in Rome?"}], tools=[WEATHER, TIME],
        tool_choice="required", max_tokens=120, seed=7, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert not any(d.content for d in deltas)  # a forced call is never text
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
    assert calls[0].function.name in ("get_weather", "get_time")
    params = WEATHER_PARAMS if calls[0].function.name == "get_weather" else TIME["function"]["parameters"]
    jsonschema.validate(json.loads(calls[0].function.arguments), params)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_openai_generic_template_forced_call_validates_on_smollm2(client):
    r = client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER],
                                       tool_choice=NAMED, max_tokens=120, seed=3)
    assert r.choices[0].finish_reason == "tool_calls"
    valid_weather_call(r.choices[0].message.tool_calls[0])


@pytest.mark.parametrize(("extra", "says"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objec"}}}]},
     "tools[0].function.parameters: invalid schema at #/type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope' is not among"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}}}],
      "tool_choice": "required"}, "tools[0].function.parameters: unsupported keyword 'not'"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
])
def test_bad_tools_are_a_400_naming_the_path(client, extra: dict, says: str):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": "hi"}], max_tokens=4, **extra)
    assert says in str(e.value), str(e.value)


def test_ollama_chat_with_tools_and_the_result_sent_back(server: ServerProcess):
    client = ollama.Client(host=server.url)
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat(model=QWEN, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 100})
    calls = r.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    jsonschema.validate(dict(calls[0].function.arguments), WEATHER_PARAMS)
    messages.append(r.message)
    messages.append({"role": "tool", "content": "Sunny, 31 degrees Celsius.", "tool_name": "get_weather"})
    second = client.chat(model=QWEN, messages=messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 60})
    assert second.done and second.prompt_eval_count >= r.prompt_eval_count + 20  # the call and its result went in
    for tc in second.message.tool_calls or []:  # the model may call again: each call is still well formed
        jsonschema.validate(dict(tc.function.arguments), WEATHER_PARAMS)


def test_an_agent_loops_turns_render_through_qwens_template():
    from edgellm.runtime.engine import Engine
    from tests.dev_models import dev_model

    engine = Engine.load(str(dev_model(QWEN)), n_ctx=512)
    try:
        text = engine.render_chat([
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "Sunny, 31 degrees Celsius.", "tool_call_id": "c1", "name": "get_weather"},
        ], tools=[WEATHER])
    finally:
        engine.close()
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nSunny, 31 degrees Celsius.\n</tool_response><|im_end|>" in text


def test_ollama_streamed_tool_call_arrives_whole(server: ServerProcess):
    chunks = list(ollama.Client(host=server.url).chat(
        model=QWEN, messages=[{"role": "user", "content": QUESTION}], tools=[WEATHER], stream=True,
        options={"temperature": 0, "num_predict": 100}))
    calls = [tc for c in chunks for tc in (c.message.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert dict(calls[0].function.arguments)["city"] == "Paris"
    assert chunks[-1].done and chunks[-1].done_reason == "stop"
