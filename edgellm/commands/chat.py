"""`edgellm chat`: the Textual app on a terminal, a line-mode chat with --plain or without a TTY."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import read_info
from edgellm.memory.pressure import default_watch
from edgellm.model_defaults import Defaults
from edgellm.models import BETTER_MODEL_PULL, default_model, resolve
from edgellm.options import (
    Planned,
    add_model_arguments,
    add_sampling_arguments,
    check_ranges,
    planned_load,
    sampling_defaults,
)
from edgellm.session import ChatSession
from edgellm.speculative.setup import make_speculator

HELP = "commands: /reset (new conversation), /stats (last reply's speed), /exit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system message (default: the model's)")
    p.add_argument("--plain", action="store_true", help="line-mode chat, even on a terminal")
    p.add_argument("--resume", action="store_true", help="reopen the last conversation (the terminal UI's history)")


def main(a: argparse.Namespace) -> int:
    check_ranges(a)
    explicit = resolve(a.model) if a.model else None  # an unknown model fails here, before any screen
    if sys.stdin.isatty() and sys.stdout.isatty() and not a.plain:
        from edgellm.tui.app import run_app

        # the app's first frame does not wait for the model scan, the header read or the memory plan
        return run_app(functools.partial(prepare, a, explicit), a.resume, a.max_tokens, tuple(a.stop),
                       workers={"rpc": a.rpc, "ram": a.ram})
    _, planned, defaults, embedded = prepare(a, explicit)
    if a.resume:
        raise EdgeLLMError("--resume reopens the terminal UI's history: run `edgellm chat --resume` on a terminal, "
                           "without --plain")
    for note in planned.plan.notes:
        print(f"edgellm: {note}", file=sys.stderr)
    if planned.split:  # a lost worker costs a pause, not the conversation
        engine = planned.load_split()
        try:
            session = ChatSession(engine, defaults.sampling, a.max_tokens, defaults.system, tuple(a.stop))
            return plain_chat(session, sys.stdin.isatty() and sys.stdout.isatty(), embedded)
        finally:
            engine.close()
    engine = planned.load()
    session = ChatSession(engine, defaults.sampling, a.max_tokens, defaults.system, tuple(a.stop),
                          speculator=make_speculator(engine, planned.draft, watch=default_watch(),
                                                     draft_gpu_layers=planned.draft_gpu_layers))
    return plain_chat(session, sys.stdin.isatty() and sys.stdout.isatty(), embedded)


def prepare(a: argparse.Namespace, path: Path | None) -> tuple[Path, Planned, Defaults, bool]:
    """The model (the best local chat model when none is named), its sampling defaults and memory plan."""
    embedded = False
    if path is None:
        chosen = default_model()
        path, embedded = chosen.path, chosen.embedded
    info = read_info(path)
    return path, planned_load(a, info), sampling_defaults(a, info), embedded


def plain_chat(session: ChatSession, interactive: bool, embedded: bool = False) -> int:
    out = sys.stdout
    if interactive:
        out.write(f"edgellm chat · {session.engine.info.name} · {HELP}\n")
        if embedded:
            out.write(f"(the small embedded model; for better answers: {BETTER_MODEL_PULL})\n")
    last = None
    while True:
        if interactive:
            out.write("\n> ")
            out.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            session.reset()
            out.write("(new conversation)\n")
            continue
        if text == "/stats":
            s = last.stats if last else None
            out.write(f"{s.as_dict()} · {last.finish_words}\n" if s else "(no reply yet)\n")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        try:
            for last in session.send(text):
                if last.event:  # memory pressure: what was given up, beside the text
                    print(f"edgellm: {last.event}", file=sys.stderr)
                out.write(last.text)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        if interactive and last is not None and last.finish_reason not in ("eog", "stop"):
            out.write(f"\n[{last.finish_words}]")
        out.write("\n")
        out.flush()
    return 0
