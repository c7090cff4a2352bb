"""`edgellm chat`: the Textual app on a terminal, a line-mode chat with --plain or without a TTY."""

from __future__ import annotations

import argparse
import sys

from .engine import Engine
from .models import resolve
from .options import add_model_arguments, add_sampling_arguments, load_options, sampling_params
from .session import ChatSession
from .speculative.setup import make_speculator

HELP = "commands: /reset (new conversation), /stats (last reply's speed), /exit"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--plain", action="store_true", help="line-mode chat, even on a terminal")


def main(a: argparse.Namespace) -> int:
    path = resolve(a.model)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive and not a.plain:
        try:
            from .tui.app import run_app
        except ImportError:  # the Textual app is not there yet: line mode
            pass
        else:
            return run_app(path, load_options(a), sampling_params(a), a.max_tokens, a.system,
                           tuple(a.stop), a.draft)
    engine = Engine(path, load_options(a))
    session = ChatSession(engine, sampling_params(a), a.max_tokens, a.system, tuple(a.stop),
                          speculator=make_speculator(engine, a.draft))
    return plain_chat(session, interactive)


def plain_chat(session: ChatSession, interactive: bool) -> int:
    out = sys.stdout
    if interactive:
        out.write(f"edgellm chat · {session.engine.info.name} · {HELP}\n")
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
            out.write(f"{s.as_dict()}\n" if s else "(no reply yet)\n")
            continue
        if text.startswith("/") and text.split()[0] in ("/help", "/?"):
            out.write(HELP + "\n")
            continue
        try:
            for last in session.send(text):
                out.write(last.text)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [interrupted]")
        out.write("\n")
        out.flush()
    return 0
