"""The chat-template renderer refuses a broken or hostile template with EdgeLLMError, in one line that names
the template's line, whatever the template raises (tests/fuzz/fuzz_template.py checks the same on any
input)."""

from __future__ import annotations

import re
import time

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellm import chat_template
from edgellm.errors import EdgeLLMError

USER = [{"role": "user", "content": "What is the capital of France?"}]


def refusal(source: str) -> str:
    with pytest.raises(EdgeLLMError) as failed:
        chat_template.render(source, USER)
    assert type(failed.value) is EdgeLLMError
    message = str(failed.value)
    assert "\n" not in message and message.startswith("the model's chat template failed at line "), message
    return message


def test_unary_plus_on_a_string_found_by_the_fuzzer_is_a_refusal_naming_its_line():
    # the fuzzer's input: `'<|im_e~d|'> \n+ ''` parses as `'...' > (+'')`, a TypeError raised on line 3
    source = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']\n"
              "+ '<|im_e~d|'> \n+ ''}}{% endfor %}")
    message = refusal(source)
    assert message == "the model's chat template failed at line 3: TypeError: bad operand type for unary +: 'str'"


@pytest.mark.parametrize(("body", "error"), [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages[0]['content'].upper(1) }}", "TypeError"),
    ("{{ messages[0]['content'] - 1 }}", "TypeError"),
    ("{{ '%d' % messages[0]['content'] }}", "TypeError"),
    ("{{ messages[0].content.nope.deeper }}", "has no attribute|undefined"),
    ("{{ messages[0]['content'].split('') }}", "ValueError"),
    ("{{ messages[7] }}{{ messages[7]['role'] }}", "undefined|no element"),
    ("{{ range(10**10) | list }}", "OverflowError"),
    ("{{ raise_exception('a two-line\\nmessage') }}", "a two-line message"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{{ nope | no_such_filter }}", "No filter named"),
    ("{% include 'other.jinja' %}", "TypeError"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),
])
def test_any_exception_a_template_raises_is_a_one_line_refusal_naming_the_line(body: str, error: str):
    # line 3 of a template that loops over the messages, as real ones do
    source = "{% for message in messages %}\n{{ message['role'] }}\n" + body + "\n{% endfor %}"
    message = refusal(source)
    assert message.startswith("the model's chat template failed at line 3: "), message
    assert re.search(error, message), message


@pytest.mark.parametrize(("source", "line"), [
    ("ok\n{% for x in %}", 2),  # jinja's own syntax error
    ("ok\n\n{{ messages[0] }\n", 3),
    ("ok\n{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}", 2),  # the parser runs out of stack
    ("a\n{{ 1 " + "+ 1 " * 5000 + "}}", 2),  # so does the code generator
    ("a\nb\nc\n\nd" + "{% if 1 %}" * 200 + "x" + "{% endif %}" * 200, 5),  # Python will not compile jinja's code
])
def test_a_template_that_does_not_compile_is_refused_naming_the_line(source: str, line: int):
    assert refusal(source).startswith(f"the model's chat template failed at line {line}: ")


@pytest.mark.parametrize(("body", "why"), [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took over"),
    ("{{ 'a' * 1000000000 }}", "builds a value"),
    ("{% for i in range(100000) %}{{ 'x' * 90 }}{% endfor %}", "passed"),
    ("{% for i in range(100000) %}" + "x" * 90 + "{% endfor %}", "passed"),  # text, not expressions
    ("{{ 10 ** 100000000 }}", "huge power"),
    # no call in the inner loop: its items check the deadline
    ("{% set r = range(100000) %}{% for a in r %}{% for b in r %}{% endfor %}{% endfor %}", "took over"),
    ("{% for x in [1, 2, 3] recursive %}{% if loop.depth < 30 %}{{ loop([1, 2, 3]) }}{% endif %}{% endfor %}", "took over"),
])
def test_the_sandbox_limits_name_the_line_too(body: str, why: str):
    t0 = time.monotonic()
    message = refusal("{{ messages[0]['content'] }}\n" + body)
    assert time.monotonic() - t0 < chat_template.RENDER_SECONDS + 1.0
    assert message.startswith("the model's chat template failed at line 2: ") and why in message, message


def test_a_good_template_still_renders():
    assert chat_template.render(None, USER) == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                                "<|im_start|>assistant\n")


# Real templates as their models ship them, which the checks must leave rendering as jinja renders them: Qwen2.5's
# (Qwen2.5-Coder-0.5B-Instruct's GGUF), SmolLM2's (SmolLM2-135M-Instruct's GGUF) and Gemma 3's (gemma-3-270m-it's).
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501
SMOLLM2 = r"""{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"""
GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}"""

CHAT = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]


@pytest.mark.parametrize(("template", "messages", "prompt"), [
    (QWEN25, USER, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
    (QWEN25, CHAT, "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                   "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
                   "<|im_start|>assistant\n"),
    (SMOLLM2, USER, "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"),
    (SMOLLM2, CHAT, "<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
                    "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Italy?<|im_end|>\n"
                    "<|im_start|>assistant\n"),
    (GEMMA3, USER, "<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"),
    (GEMMA3, CHAT, "<bos><start_of_turn>user\nAnswer in one word.\n\nCapital of France?<end_of_turn>\n"
                   "<start_of_turn>model\nParis.<end_of_turn>\n<start_of_turn>user\nAnd of Italy?<end_of_turn>\n"
                   "<start_of_turn>model\n"),
])
def test_real_templates_render(template: str, messages: list[dict[str, str]], prompt: str):
    assert chat_template.render(template, messages, bos_token="<bos>") == prompt


def test_a_long_chat_renders_within_the_limits():
    # the checks on calls skip what only counts or picks: `messages|length` in a loop over 2,000 turns (Qwen3's
    # template does that) must not measure every message at every turn
    chat = [{"role": role, "content": f"turn {i} " * 20} for i in range(1000) for role in ("user", "assistant")]
    counting = ("{% for message in messages %}{% if loop.index0 < messages|length - 1 %}{{ message.content|trim ~ '|' }}"
                "{% endif %}{% endfor %}")
    assert chat_template.render(QWEN25, chat).count("<|im_start|>") == 2002
    assert chat_template.render(counting, chat).count("|") == 1999


@pytest.mark.parametrize("source", [
    "{% set a, b = 1, messages[0].role %}{{ a }}{{ b }}"
    "{% for k, v in {'x': 1, 'y': [2, a]}.items() %}{{ k }}={{ v }}{% endfor %}",
    "{% for m in messages * 3 %}{{ loop.index }}/{{ loop.length }}{{ loop.last }}{{ loop.revindex }}"
    "{{ loop.cycle('a', 'b') }}{% endfor %}"
    "{% for m in messages|selectattr('role') if m.role %}{{ loop.length }}{{ loop.last }}{% else %}none{% endfor %}",
    "{% for x in [1, [2, [3, []]]] recursive %}{% if x is iterable %}[{{ loop(x) }}]{% else %}{{ x }}{% endif %}"
    "{% endfor %}",
    "{{ 'a' ~ 1 ~ messages[0].role ~ none }}{% autoescape true %}{{ '<' ~ ('<b>'|safe) }}"
    "{{ messages[0].role ~ ('<b>'|safe) }}{% endautoescape %}",
    "{% macro m(x, y=2) %}{{ x }}{{ y }}{{ varargs }}{{ kwargs }}{{ caller() if caller }}{% endmacro %}{{ m(1) }}"
    "{{ m(1, 3, 4, z=5) }}{% call m(9) %}in{% endcall %}{% set b %}{{ m(0) }}{% endset %}{{ b }}"
    "{% filter upper %}up{% endfilter %}",
    "{% if false %}{% block b %}block {{ messages|length }}{% endblock %}{% endif %}{{ self.b() }}{{ self.b() }}",
    "{{ [1, messages[0].role] + [2] }}{{ (1, messages[0].role) }}{{ {'k': messages[0].role, messages[0].role: [1]} }}",
    "{{ '%s-%05d-%(x)s' % ('a', 3) if false else '%s-%05d' % ('a', 3) }}{{ '{}|{:>5}|{x:.2f}'.format(1, 'r', x=2) }}"
    "{{ '%(a)s'|format(a=1) }}{{ '{a}'.format_map({'a': messages[0].role}) }}",
    "{{ 'abc'.center(9, '*') }}{{ 'x'|center(5) }}{{ 'a\nb'|indent(2, true) }}{{ [1, 2, 3, 4, 5]|batch(2, 0)|list }}"
    "{{ [1, 2, 3]|slice(2, 9)|list }}{{ 'a b c'|wordwrap(3) }}{{ 'hello world'|truncate(8, leeway=0) }}",
    "{{ ['a', 'b']|join(', ') }}{{ messages|map(attribute='role')|join('/') }}{{ 'x'.join(['1', '2']) }}"
    "{{ 'a.b'|replace('.', '::') }}{{ 'tab\there'.expandtabs(4) }}{{ '5'.zfill(3) }}{{ 'abc'.translate({97: 'xy'}) }}",
    "{{ messages|tojson }}{{ messages|tojson(indent=2) }}{{ [1, 'é']|pprint }}{{ 'a b'|urlencode }}{{ 'é'.encode() }}",
    "{% set ns = namespace(n=0, roles=[]) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% set ns.roles = ns.roles + [m.role] %}{% endfor %}{{ ns.n }}{{ ns.roles }}"
    "{{ 2 ** 10 }}{{ 3 * 4 }}{{ 'ab' * 3 }}{{ [0] * 3 }}{{ 7 % 3 }}{{ 2 ** 64 * 3 }}",
    "{{ range(5)|list }}{{ range(3)|sum }}{{ [[1], [2]]|sum(start=[0]) }}{{ dict(a=1) }}{{ (1).to_bytes(2, 'big') }}"
    "{{ {}.fromkeys(['a'], 1) }}{{ lipsum(1, html=false, min=2, max=3)|wordcount > 0 }}",
])
def test_the_checks_leave_what_jinja_renders_unchanged(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = chat_template._tojson
    expected = env.from_string(source).render(messages=USER)
    assert chat_template.render(source, USER) == expected


@pytest.mark.parametrize("body", [
    # str (and bytes) methods that pad, repeat or join: their size is estimated from their arguments
    "{{ 'x'.center(10**10) }}",
    "{{ 'x'.ljust(10**10) }}",
    "{{ 'x'.rjust(10**10) }}",
    "{{ 'x'.zfill(10**10) }}",
    "{{ 'x'.encode().center(10**10) }}",
    "{{ ('\\t' * 1000).expandtabs(10**8) }}",
    "{{ ('x' * 1000).replace('', 'y' * 100000) }}",
    "{{ ('x' * 4000).replace('x', 'y' * 4000) }}",
    "{{ ('y' * 4000).join('x' * 4000) }}",
    "{{ ('x' * 10000).translate({120: 'y' * 1000000}) }}",
    "{{ ('\u4e00' * 100000).encode('ascii', 'namereplace') }}",
    "{{ (1).to_bytes(10**10, 'big') }}",
    "{{ {}.fromkeys(range(100000), 'x' * 1000000) }}",
    # formatting: widths and precisions, `*` widths, nested fields, repeated fields
    "{{ '%10000000000d' % 1 }}",
    "{{ '%*d' % (10**10, 1) }}",
    "{{ '%.1000000000f' % 1.0 }}",
    "{{ '%(a)10000000000s' % {'a': 1} }}",
    "{{ '%10000000000d'|format(1) }}",
    "{{ '{:10000000000}'.format(1) }}",
    "{{ '{:.1000000000f}'.format(1.0) }}",
    "{{ '{:{w}}'.format(1, w=10**10) }}",
    "{{ '{a:10000000000}'.format_map({'a': 1}) }}",
    "{{ ('{0}' * 100).format('x' * 1000000) }}",
    # filters that grow a value by an argument
    "{{ 'x'|center(10**10) }}",
    "{{ ('x\\n' * 10000)|indent(10**6) }}",
    "{{ ('x\\r' * 10000)|indent('y' * 1000000) }}",
    "{{ [1]|batch(10**10, 'x')|list }}",
    "{{ [1]|slice(10**9, 'x')|list }}",
    "{{ ('a ' * 10000)|wordwrap(1, wrapstring='x' * 100000) }}",
    "{{ ('x' * 1000)|replace('', 'y' * 100000) }}",
    "{{ (['x' * 1000000] * 3)|join('y' * 1000000) }}",
    "{{ [1, 2]|tojson(indent=10**9) }}",
    "{{ [[[1]]]|tojson(indent='x' * 2000000) }}",
    "{{ (['\\x00' * 100] * 20000)|pprint }}",  # repr writes \x00 in 4
    "{{ ('www.x.com ' * 1000)|urlize(target='y' * 100000) }}",
    "{{ ('\U0001f600' * 400000)|urlencode }}",
    "{{ lipsum(10**6) }}",
    "{{ lipsum(1, min=10**8, max=10**8 + 1) }}",
    "{{ strftime_now('%c' * 1000000) }}",
    # operators: repetition, concatenation, `~`, and a value printed many times over by aliasing
    "{{ ['x'] * 10**10 }}",
    "{{ ['x' * 4000000] * 4000000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    # a few kilobytes in memory, 2**100 copies of [1] once printed, compared or hashed
    "{% set ns = namespace(a=[1]) %}{% for i in range(100) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}",
    "{% set ns = namespace(a=[1]) %}{% for i in range(100) %}{% set ns.a = (ns.a, ns.a) %}{% endfor %}{{ ns.a }}",
    "{% set ns = namespace(a=[1]) %}{% for i in range(100) %}{% set ns.a = {'a': ns.a, 'b': ns.a} %}{% endfor %}"
    "{{ ns.a }}",
    "{% set ns = namespace(a=[1]) %}{% for i in range(100) %}{% set ns.a = namespace(a=ns.a, b=ns.a) %}{% endfor %}"
    "{{ ns.a }}",
    "{% set s = 'x' * 3000000 %}{% set ns = namespace(a=s) %}{% set ns.b = s %}{{ ns }}",
    # what a macro, a call, filter or set block, or a block called again renders, joined whole
    "{% set a = 'x' * 4000000 %}{% macro m() %}{% for i in range(100000) %}{{ a }}{% endfor %}{% endmacro %}{{ m() }}",
    "{% set a = 'x' * 4000000 %}{% set b %}{% for i in range(100000) %}{{ a }}{% endfor %}{% endset %}",
    "{% set a = 'x' * 4000000 %}{% filter upper %}{% for i in range(100000) %}{{ a }}{% endfor %}{% endfilter %}",
    "{% set a = 'x' * 4000000 %}{% macro m() %}{{ caller() }}{% endmacro %}{% call m() %}{{ a }}{{ a }}{% endcall %}",
    "{% set a = 'x' * 4000000 %}{% if false %}{% block b %}{% for i in range(100000) %}{{ a }}{% endfor %}{% endblock %}"
    "{% endif %}{{ self.b() }}",
])
def test_a_call_or_operator_that_would_build_a_huge_value_is_refused_before_building_it(body: str):
    t0 = time.monotonic()
    message = refusal("{{ messages[0]['content'] }}\n" + body)
    assert time.monotonic() - t0 < chat_template.RENDER_SECONDS
    assert re.match(r"the model's chat template failed at line 2: the template (builds|prints) a value ", message), message


@pytest.mark.parametrize("body", [
    "{% set ns = namespace(x=3) %}{% for i in range(100) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "{{ (((10**64)**64)**64)**64 }}",
])
def test_a_huge_number_is_refused_before_computing_it(body: str):
    message = refusal("{{ messages[0]['content'] }}\n" + body)
    assert message.startswith("the model's chat template failed at line 2: the template computes a huge "), message


def test_sum_never_adds_to_the_templates_own_list():
    # jinja's sum adds to its start in place: a list doubling at each turn of a loop, past every check
    source = "{% set l = [1] %}{% for i in range(100) %}{% set x = [l]|sum(start=l) %}{% endfor %}{{ l }}"
    assert chat_template.render(source, USER) == "[1]"
