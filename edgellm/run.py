"""`edgellm run MODEL "prompt"`: one completion, streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys

from .engine import Engine
from .models import resolve
from .options import add_model_arguments, add_sampling_arguments, load_options, sampling_params
from .speculative.setup import make_speculator


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("prompt", nargs="?", default=None, help="the prompt (default: read stdin)")
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--raw", action="store_true", help="no chat template: complete the text as it is")
    p.add_argument("--json", action="store_true", help="print one JSON object: text, finish reason, stats")


def main(a: argparse.Namespace) -> int:
    prompt = a.prompt
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise SystemExit('edgellm: give a prompt: edgellm run MODEL "prompt" (or pipe it on stdin)')
        prompt = sys.stdin.read()
    engine = Engine(resolve(a.model), load_options(a))
    if a.raw:
        tokens = engine.tokenize(prompt)
    else:
        messages = [{"role": "system", "content": a.system}] if a.system else []
        tokens = engine.chat_tokens([*messages, {"role": "user", "content": prompt}])
    speculator = make_speculator(engine, a.draft)
    text, record = [], None
    for record in engine.generate(tokens, sampling=sampling_params(a), max_tokens=a.max_tokens,
                                  stop=a.stop, speculator=speculator):
        if a.json:
            text.append(record.text)
        else:
            sys.stdout.write(record.text)
            sys.stdout.flush()
    if a.json:
        assert record is not None
        out = {"model": str(engine.path), "text": "".join(text), "finish_reason": record.finish_reason,
               "stats": record.stats.as_dict()}
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    if speculator is not None:
        speculator.close()
    engine.close()
    return 0
