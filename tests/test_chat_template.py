"""The chat-template renderer refuses a broken or hostile template with EdgeLLMError, in one line that names
the template's line, whatever the template raises (tests/fuzz/fuzz_template.py checks the same on any
input)."""

from __future__ import annotations

import re
import time

import pytest

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
])
def test_the_sandbox_limits_name_the_line_too(body: str, why: str):
    t0 = time.monotonic()
    message = refusal("{{ messages[0]['content'] }}\n" + body)
    assert time.monotonic() - t0 < chat_template.RENDER_SECONDS + 1.0
    assert message.startswith("the model's chat template failed at line 2: ") and why in message, message


def test_a_good_template_still_renders():
    assert chat_template.render(None, USER) == ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                                "<|im_start|>assistant\n")
