"""`edgellm`: parses arguments and dispatches to one module per command; no logic of its own."""

from __future__ import annotations

import argparse
import importlib
import sys

from edgellm import __version__
from edgellm.errors import EdgeLLMError

# command -> (module in edgellm.commands, help)
COMMANDS = {
    "run": ("run", "generate a reply to one prompt, streamed to stdout"),
    "chat": ("chat", "chat with a model (terminal UI; --plain for line mode)"),
    "models": ("models", "list local models"),
    "pull": ("pull", "download a GGUF from the Hugging Face hub"),
    "doctor": ("doctor", "check this machine, the llama.cpp build and a test decode"),
    "plan": ("plan", "what loading a model takes in memory, where each part goes, and what fits"),
    "bench": ("bench", "measure prompt and decode speed (like llama-bench)"),
    "quantize": ("quantize", "convert a Hugging Face model folder to a low-bit GGUF"),
    "serve": ("serve", "serve OpenAI- and Ollama-compatible APIs on localhost"),
    "worker": ("worker", "offer this machine's CPU/GPU to another edgellm (llama.cpp's RPC backend)"),
}


def top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description="Local LLMs, offline.")
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str):
    module, help_text = COMMANDS[name]
    mod = importlib.import_module(f"edgellm.commands.{module}")
    parser = argparse.ArgumentParser(prog=f"edgellm {name}", description=help_text)
    mod.add_arguments(parser)
    return parser, mod.main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        top_parser().parse_args(argv)  # --help, --version, or an error naming the commands
        top_parser().print_help()
        return 2
    parser, handler = command_parser(argv[0])
    # intermixed: `edgellm run MODEL -n 32 "prompt"` puts options between the positionals
    args = parser.parse_intermixed_args(argv[1:])
    try:
        return handler(args)
    except EdgeLLMError as e:
        print(f"edgellm: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgellm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
