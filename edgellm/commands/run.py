"""`edgellm run [MODEL] "prompt"`: one completion, streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import read_info
from edgellm.memory.manager import process_manager
from edgellm.memory.pressure import default_watch
from edgellm.models import default_model, is_model_spec, resolve
from edgellm.options import add_model_arguments, add_sampling_arguments, planned_load, sampling_defaults
from edgellm.runtime import grammar
from edgellm.speculative.setup import make_speculator


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system message (default: the model's)")
    p.add_argument("--raw", action="store_true", help="no chat template: complete the text as it is")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, finish reason, stats, the sampling settings in force")
    p.add_argument("--schema", metavar="FILE.json", default=None,
                   help="the reply is JSON that validates against this JSON schema, printed as it is (pipe it to jq)")
    p.add_argument("--format", choices=("text", "json"), default="text",
                   help="json: the reply is one JSON object, any (--schema constrains it further)")


def reply_grammar(a: argparse.Namespace) -> str | None:
    """The GBNF the reply follows (--schema, --format json), or None; a bad file or schema in one line."""
    if a.schema is None:
        return grammar.json_object_gbnf() if a.format == "json" else None
    try:
        text = Path(a.schema).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeLLMError(f"--schema {a.schema}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeLLMError(f"--schema {a.schema}: cannot read it: {e}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise EdgeLLMError(f"--schema {a.schema}: not JSON: {e}") from None
    except RecursionError:
        raise EdgeLLMError(f"--schema {a.schema}: nested too deeply") from None
    try:
        return grammar.schema_to_gbnf(schema)
    except grammar.SchemaError as e:
        raise EdgeLLMError(f"--schema {a.schema}: {e}") from None


def model_and_prompt(a: argparse.Namespace) -> tuple[str | None, str | None]:
    """`edgellm run "question"` (as with `llm "prompt"`): a lone argument that names no model is the prompt."""
    if a.prompt is None and a.model is not None and not is_model_spec(a.model):
        return None, a.model
    return a.model, a.prompt


def main(a: argparse.Namespace) -> int:
    model, prompt = model_and_prompt(a)
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise EdgeLLMError('give a prompt: edgellm run [MODEL] "prompt" (or pipe it on stdin)')
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise EdgeLLMError("the prompt is empty")
    structured = reply_grammar(a)  # before the load: a bad schema is refused at once
    if structured is not None:
        grammar.check_grammar(structured)
    path = resolve(model) if model else default_model().path
    info = read_info(path)
    defaults = sampling_defaults(a, info)
    planned = planned_load(a, info)
    for note in planned.plan.notes:
        print(f"edgellm: {note}", file=sys.stderr)
    sampling = defaults.sampling if structured is None else replace(defaults.sampling, grammar=structured)
    # a split model is held by a child process (remote/split.py): a lost worker costs a pause, not the reply
    engine = planned.load_split() if planned.split else planned.load()
    speculator = None if planned.split else make_speculator(engine, planned.draft, watch=default_watch(),
                                                            draft_gpu_layers=planned.draft_gpu_layers)
    kwargs = {"sampling": sampling, "max_tokens": a.max_tokens, "speculator": speculator}
    try:
        if a.raw:
            records = engine.generate(engine.tokenize(prompt), stop=a.stop, **kwargs)
        else:
            if not engine.is_chat_model:
                print(f"edgellm: {engine.info.name} has no chat template (a base model): the prompt goes in ChatML "
                      "and the reply stops at its markers; --raw completes the text as it is", file=sys.stderr)
            system = [{"role": "system", "content": defaults.system}] if defaults.system else []
            records = engine.chat([*system, {"role": "user", "content": prompt}], stop=a.stop, **kwargs)
        return report(a, records, planned, defaults, engine.path, engine.is_chat_model, structured is not None)
    finally:
        if speculator is not None:
            speculator.close()
        if planned.split:
            engine.close()
        process_manager().close()


def report(a: argparse.Namespace, records, planned, defaults, path, chat_template: bool, structured: bool) -> int:
    """Print the reply as it streams (or one JSON object), and why it ended; the exit code."""
    text, record = [], None
    for record in records:
        if record.event:  # memory pressure, a worker gone: what happened, beside the text
            print(f"edgellm: {record.event}", file=sys.stderr)
        if a.json:
            text.append(record.text)
        else:
            sys.stdout.write(record.text)
            sys.stdout.flush()
    assert record is not None
    if a.json:
        out = {"model": str(path), "text": "".join(text), "finish_reason": record.finish_reason,
               "finish": record.finish_words,
               "stats": record.stats.as_dict(), "sampling": defaults.as_dict(),
               "chat_template": chat_template, "plan": planned.plan.as_dict()}
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    # say why a reply ended early, as the TUI does; under a grammar only the end of the JSON is complete (a
    # pipeline must not take half of one: exit 1)
    incomplete = structured and record.finish_reason != "eog"
    if record.finish_reason == "error" and record.event:  # said above, in its one line
        return 1
    if incomplete or (not a.json and record.finish_reason not in ("eog", "stop")):
        print(f"edgellm: {record.finish_words}" + (f" (-n {a.max_tokens})" if record.finish_reason == "length" else "")
              + (": the JSON is incomplete" if incomplete else ""), file=sys.stderr)
    return 1 if incomplete else 0
