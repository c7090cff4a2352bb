"""Structured output: a JSON schema -> a grammar in the one decoding loop, `edgellm run --schema`, and both APIs.

Every reply is parsed with json.loads and validated with the jsonschema package; the models are the real
SmolLM2 and Qwen2.5-Coder-0.5B.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import ollama
import openai
import pytest

from edgellm.errors import EdgeLLMError
from edgellm.runtime.engine import Engine
from edgellm.runtime.grammar import (
    InvalidSchema,
    SchemaError,
    UnsupportedSchema,
    _compile,
    check_grammar,
    json_object_gbnf,
    schema_to_gbnf,
)
from edgellm.runtime.sampling import Sampler, SamplingParams
from edgellm.speculative.costs import load_or_prior
from edgellm.speculative.drafters import EditAwareLookup
from edgellm.speculative.policy import Policy
from edgellm.speculative.setup import Speculator
from tests.conftest import run_cli
from tests.support.near_tie import NEAR_TIE
from tests.support.questions import QUESTIONS
from tests.support.server import ServerProcess

# one small schema any question fits: bounded strings keep every reply well inside max_tokens
ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 48},
        "confidence": {"type": "string", "enum": ["low", "medium", "high"]},
        "topic": {"type": "string", "maxLength": 20},
        "certain": {"type": "boolean"},
    },
    "required": ["answer", "confidence", "topic", "certain"],
    "additionalProperties": False,
}
PROMPTS = [q.text for q in QUESTIONS] + [
    "What is the largest planet in the solar system?",
    "How many legs does a spider have?",
    "What language is spoken in Brazil?",
    "Name a fruit that is yellow.",
    "What is the freezing point of water in Fahrenheit?",
    "Who painted the Mona Lisa?",
    "What is the square root of 81?",
    "Which ocean is the largest?",
    "Suggest a name for a pet goldfish.",
    "What does CPU stand for?",
]
assert len(PROMPTS) == 20

# most of what the grammar can express, in one schema
EVERYTHING = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 16},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": ["integer", "null"]},
        "born": {"type": "string", "format": "date"},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,3}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 2},
        "owner": {"$ref": "#/$defs/person"},
        "ok": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]},
        "version": {"const": 2},
    },
    "required": ["name", "kind", "age", "born", "code", "tags", "owner", "version"],
    "additionalProperties": False,
    "$defs": {"person": {"type": "object", "description": "who owns it",
                         "properties": {"first": {"type": "string", "maxLength": 10},
                                        "id": {"anyOf": [{"type": "integer"}, {"const": "unknown"}]}},
                         "required": ["first", "id"]}},
}


def validate(text: str, schema: dict) -> object:
    value = json.loads(text)
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    return value


# -- the converter ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schema", [
    ANSWER, EVERYTHING, {}, True, {"type": "object"}, {"type": "array", "items": {"type": "number"}},
    {"type": "string", "format": "date-time"}, {"type": "string", "format": "uuid"},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
    {"type": "object", "additionalProperties": {"type": "integer"}},
    {"enum": ['quote " and \\ backslash', "ünïcode", 3, None]},
    {"type": "object", "properties": {"root": {"type": "string"}, "space": {"type": "integer"},
                                      "a b/c": {"type": "boolean"}}},
    {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}}}},
    {"type": "string", "maxLength": 2000},
    {"$defs": {"s": {"type": "string"}, "e": {"enum": [1, 2]}, "any": True},
     "properties": {"a": {"$ref": "#/$defs/s"}, "b": {"$ref": "#/$defs/e"}, "c": {"$ref": "#/$defs/any"},
                    "d": {"$ref": "#/properties/a"}}},
])
def test_supported_schemas_become_grammars_llama_cpp_accepts(schema):
    check_grammar(schema_to_gbnf(schema))


@pytest.mark.parametrize("schema, keyword, where", [
    ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}, "minimum", "#/properties/age"),
    ({"type": "number", "multipleOf": 5}, "multipleOf", "#"),
    ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf", "#"),
    ({"not": {"type": "string"}}, "not", "#"),
    ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if", "#"),
    ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf", "#"),
    ({"type": "array", "items": {"type": "string", "pattern": "^a.b$"}}, "pattern", "#/items"),
    ({"type": "string", "pattern": "abc"}, "pattern", "#"),
    ({"type": "string", "format": "email"}, "format", "#"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties", "#"),
    ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]}, "required", "#"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems", "#"),
    ({"type": "string", "maxLength": 5000}, "maxLength", "#"),
    ({"properties": {"a": {"$ref": "https://example.com/s.json"}}}, "$ref", "#/properties/a"),
    ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "$ref", "#/properties/a"),
    ({"$defs": {"n": {"type": "integer", "maximum": 3}}, "properties": {"x": {"$ref": "#/$defs/n"}}}, "maximum",
     "#/$defs/n"),
    ({"type": "string", "enum": ["long", "no"], "maxLength": 2, "minLength": 3}, "enum", "#"),
])
def test_unsupported_keywords_are_refused_by_name_and_place(schema, keyword, where):
    with pytest.raises(UnsupportedSchema) as e:
        schema_to_gbnf(schema)
    assert e.value.keyword == keyword and e.value.pointer == where
    assert f"{keyword!r}" in str(e.value) and where in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "#/properties/a/type"),
    ({"type": "array", "items": {"type": "string", "maxLength": -1}}, "#/items/maxLength"),
    ({"properties": {"a": {"type": "string", "pattern": "(unclosed"}}}, "#/properties/a/pattern"),
    ({"required": "name"}, "#/required"),
    ([1, 2], "#"),
])
def test_a_malformed_schema_names_the_path_of_the_problem(schema, where):
    with pytest.raises(InvalidSchema) as e:
        schema_to_gbnf(schema)
    assert e.value.pointer == where and where in str(e.value)


def test_compilation_is_cached_per_schema():
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}, "required": ["cached"]}
    first = schema_to_gbnf(schema)
    hits = _compile.cache_info().hits
    assert schema_to_gbnf(json.loads(json.dumps(schema))) is first
    assert _compile.cache_info().hits == hits + 1
    reordered = {"required": ["cached"], "properties": {"cached": {"type": "integer"}}, "type": "object"}
    assert schema_to_gbnf(reordered) == first  # another text, the same grammar


# -- the decoding loop (SmolLM2 in process) -----------------------------------------------------------------

def reply(engine: Engine, prompt: str, sampling: SamplingParams, max_tokens: int, speculator=None):
    engine.reset()
    records = list(engine.chat([{"role": "user", "content": prompt}], sampling=sampling, max_tokens=max_tokens,
                               speculator=speculator))
    return records, "".join(r.text for r in records)


def test_every_sampled_reply_parses_validates_and_ends_with_the_json(engine: Engine):
    gbnf = schema_to_gbnf(EVERYTHING)
    curve = load_or_prior(engine)
    for seed in range(4):
        for speculator in (None, Speculator(EditAwareLookup(), Policy(curve, fixed=4))):
            records, text = reply(engine, "Describe a pet as JSON: Rex, a dog born 2020-05-01, owned by Ann.",
                                  SamplingParams(seed=seed, grammar=gbnf), 400, speculator)
            assert records[-1].finish_reason == "eog", (seed, text)  # the end of the JSON, no token limit
            validate(text, EVERYTHING)
            assert text.rstrip().endswith("}")  # nothing after the JSON but a space


def test_greedy_under_a_grammar_is_the_same_with_speculation_on_and_off(engine: Engine):
    schema = {"type": "object", "properties": {"people": {"type": "array", "maxItems": 4, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                         "city": {"type": "string", "maxLength": 24}},
        "required": ["name", "city"], "additionalProperties": False}}}, "required": ["people"]}
    gbnf = schema_to_gbnf(schema)
    prompt = ("List the people as JSON. Alice Martin lives in Paris. Bruno Silva lives in Lisbon. "
              "Chen Wei lives in Shanghai.")
    greedy = SamplingParams(temperature=0.0, grammar=gbnf)
    plain_records, plain_text = reply(engine, prompt, greedy, 160)
    spec_records, spec_text = reply(engine, prompt, greedy, 160,
                                    Speculator(EditAwareLookup(), Policy(load_or_prior(engine), fixed=8)))
    assert spec_records[-1].stats.drafted_tokens > 0 and spec_records[-1].stats.accepted_tokens > 0
    validate(plain_text, schema)
    validate(spec_text, schema)
    plain = [r.token for r in plain_records if r.token is not None]
    spec = [r.token for r in spec_records if r.token is not None]
    diverge = next((i for i, (a, b) in enumerate(zip(plain, spec, strict=False)) if a != b), None)
    if diverge is None:
        assert plain_text == spec_text
        return
    # a batched row may differ from a single decode in a logit's last bits: only at a near-tie of the tokens
    # the grammar allows there
    tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
    engine.reset()
    engine.prefill(tokens + plain[:diverge])
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, grammar=gbnf), engine.n_vocab,
                      vocab=engine.vocab)
    for token in plain[:diverge]:
        sampler.accept(token)
    allowed, _ = sampler.candidates(engine.ctx, -1)
    sampler.close()
    logits = engine.logits(-1)
    ranked = sorted(allowed.tolist(), key=lambda t: -logits[t])
    assert spec[diverge] == ranked[1] and logits[ranked[0]] - logits[ranked[1]] < NEAR_TIE


def test_greedy_asks_the_grammar_about_the_best_logits_and_picks_what_the_whole_row_would(engine: Engine):
    """Greedy's shortcut (the argmax, then the best 128 logits) against the grammar applied to the whole row,
    at every position of a reply."""
    gbnf = schema_to_gbnf(ANSWER)
    greedy = SamplingParams(temperature=0.0, grammar=gbnf)
    records, _ = reply(engine, "Who wrote Hamlet?", greedy, 128)
    assert records[-1].finish_reason == "eog"
    tokens = [r.token for r in records if r.token is not None]
    prompt = engine.chat_tokens([{"role": "user", "content": "Who wrote Hamlet?"}])
    full = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, grammar=gbnf), engine.n_vocab,
                   vocab=engine.vocab)
    shortcut = Sampler(greedy, engine.n_vocab, vocab=engine.vocab)
    engine.reset()
    engine.prefill(prompt)
    shortcuts = 0
    for token in [*tokens, None]:
        allowed, _ = full.candidates(engine.ctx, -1)  # every token the grammar allows here
        row = engine.logits(-1)
        assert 0 < allowed.size < engine.n_vocab
        best = int(allowed[np.argmax(row[allowed])]) if allowed.size > 1 else int(allowed[0])
        chosen = shortcut._best_allowed(row)
        assert chosen in (None, best)
        shortcuts += chosen is not None
        if token is None:
            # the JSON is complete: only the end is left (or the one space the grammar allows after a value)
            assert all(engine.is_eog(int(t)) or engine.detokenize([int(t)]) == " " for t in allowed)
            break
        full.accept(token)
        shortcut.accept(token)
        engine.decode_one(token)
    assert shortcuts > len(tokens) // 2  # the whole row only where the model wanted what the grammar forbids
    full.close()
    shortcut.close()


# -- `edgellm run --schema` ---------------------------------------------------------------------------------

def test_run_schema_prints_a_reply_that_parses_and_validates(tmp_path: Path):
    path = tmp_path / "answer.json"
    path.write_text(json.dumps(ANSWER))
    out = run_cli("run", "smollm2-135m", "What is the capital of France?", "--schema", str(path), "--temp", "0",
                  "-n", "128")
    assert out.returncode == 0, out.stderr
    value = validate(out.stdout, ANSWER)
    assert "paris" in json.dumps(value).lower()
    out = run_cli("run", "smollm2-135m", "Give a color and its hex code.", "--format", "json", "--temp", "0",
                  "-n", "256", "--draft", "edit")
    assert out.returncode == 0, out.stderr
    assert isinstance(json.loads(out.stdout), dict)


def test_run_refuses_a_bad_schema_file_in_one_line(tmp_path: Path):
    (tmp_path / "bad.json").write_text('{"type": "object",')
    (tmp_path / "min.json").write_text(json.dumps({"properties": {"age": {"type": "integer", "minimum": 0}}}))
    (tmp_path / "typo.json").write_text(json.dumps({"properties": {"age": {"type": "int"}}}))
    cases = {"missing.json": "no such file", "bad.json": "not JSON", "min.json": "'minimum' at #/properties/age",
             "typo.json": "#/properties/age/type"}
    for name, expected in cases.items():
        out = run_cli("run", "smollm2-135m", "hi", "--schema", str(tmp_path / name))
        assert out.returncode != 0 and out.stdout == ""
        assert out.stderr.count("\n") == 1 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_run_exits_1_when_the_json_is_cut_by_the_token_limit(tmp_path: Path):
    path = tmp_path / "answer.json"
    path.write_text(json.dumps(ANSWER))
    out = run_cli("run", "smollm2-135m", "What is 2+2?", "--schema", str(path), "--temp", "0", "-n", "3")
    assert out.returncode == 1 and "the JSON is incomplete" in out.stderr


# -- the server: OpenAI's and Ollama's clients --------------------------------------------------------------

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from tests.dev_models import dev_model

    dev_model("qwen2.5-coder-0.5b")  # fetched once into the dev-models dir
    tmp = tmp_path_factory.mktemp("serve-tmp")
    with ServerProcess("--model", MODELS[0], "--model", MODELS[1], "--parallel", "4", "--ctx", "1024",
                       env={"TMPDIR": str(tmp)}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)


RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}


@pytest.mark.parametrize("model", MODELS)
def test_openai_json_schema_every_reply_parses_and_validates_streamed_and_not(client, model: str):
    def ask(job: tuple[int, bool]) -> tuple[str, str | None]:
        i, stream = job
        kwargs = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i]}], "max_tokens": 200,
                  "seed": i, "response_format": RESPONSE_FORMAT}
        if not stream:
            r = client.chat.completions.create(**kwargs)
            return r.choices[0].message.content, r.choices[0].finish_reason
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        finish = next((c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason), None)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), finish

    with ThreadPoolExecutor(4) as pool:  # batched by the server's scheduler, 4 slots
        replies = list(pool.map(ask, [(i, stream) for i in range(len(PROMPTS)) for stream in (False, True)]))
    assert len(replies) == 40
    for (text, finish), job in zip(replies, [(i, s) for i in range(20) for s in (False, True)], strict=True):
        assert finish == "stop", (job, text)
        validate(text, ANSWER)


def test_openai_json_object_and_completions(client):
    r = client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "Describe a cat."}],
                                       max_tokens=96, temperature=0, response_format={"type": "json_object"})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # an object the model kept writing: the part written still follows the grammar
        assert text.lstrip().startswith("{")
    r = client.completions.create(model=MODELS[0], prompt="A person as JSON:", max_tokens=160, temperature=0,
                                  extra_body={"response_format": RESPONSE_FORMAT})
    validate(r.choices[0].text, ANSWER)


def test_ollama_format_with_a_schema_and_json(server: ServerProcess):
    c = ollama.Client(host=server.url)
    for model in MODELS:
        r = c.chat(model=model, messages=[{"role": "user", "content": "Who wrote Hamlet?"}], format=ANSWER,
                   options={"num_predict": 128, "seed": 1})
        assert r.done_reason == "stop"
        validate(r.message.content, ANSWER)
        parts = list(c.chat(model=model, messages=[{"role": "user", "content": "What is 3 times 4?"}], format=ANSWER,
                            stream=True, options={"num_predict": 128, "seed": 2}))
        assert parts[-1].done and parts[-1].done_reason == "stop"
        validate("".join(p.message.content for p in parts), ANSWER)
    g = c.generate(model=MODELS[0], prompt="Name a color as JSON with a name field.", format=ANSWER,
                   options={"num_predict": 128, "temperature": 0})
    validate(g.response, ANSWER)


def test_bad_schemas_are_400s_that_name_the_keyword_and_the_path(client, server: ServerProcess):
    bounded = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}
    with pytest.raises(openai.BadRequestError, match=r"'minimum' at #/properties/age"):
        client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "hi"}], response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bounded}})
    with pytest.raises(openai.BadRequestError, match=r"invalid schema at #/properties/a/type"):
        client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "hi"}], response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"properties": {"a": {"type": "strin"}}}}})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "xml"})
    with pytest.raises(openai.BadRequestError, match=r"tools\[0\]\.function\.parameters: invalid schema at #/type"):
        client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}])
    c = ollama.Client(host=server.url)
    with pytest.raises(ollama.ResponseError, match=r"'oneOf' at #") as e:
        c.chat(model=MODELS[0], messages=[{"role": "user", "content": "hi"}], format={"oneOf": [{"type": "string"}]})
    assert e.value.status_code == 400
    r = httpx.post(f"{server.url}/api/generate", json={"model": MODELS[0], "prompt": "hi", "format": "yaml"})
    assert r.status_code == 400 and "format" in r.json()["error"]
    r = httpx.post(f"{server.url}/api/chat", json={"model": MODELS[0], "messages": [{"role": "user", "content": "hi"}],
                                                    "format": {"type": "object", "required": "a"}})
    assert r.status_code == 400 and "#/required" in r.json()["error"] and "Traceback" not in r.text
    ok = client.chat.completions.create(model=MODELS[0], messages=[{"role": "user", "content": "Say yes."}],
                                        max_tokens=4)
    assert ok.choices[0].message.content is not None  # still serving


def test_schema_errors_are_one_line_user_errors():
    assert issubclass(SchemaError, EdgeLLMError) and json_object_gbnf() == schema_to_gbnf({"type": "object"})
