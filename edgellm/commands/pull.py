"""`edgellm pull REPO [--file F] [--revision R]`: download a GGUF with huggingface-hub."""

from __future__ import annotations

import argparse

from edgellm.gguf_info import read_info
from edgellm.models import pull


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", help="Hugging Face repo id, e.g. Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF")
    p.add_argument("--file", default=None, help="GGUF file in the repo (default: a Q4_K_M if there is one)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")


def main(a: argparse.Namespace) -> int:
    path = pull(a.repo, a.file, a.revision)
    info = read_info(path)
    print(f"{a.repo}: {path.name} ({info.size_bytes / 1e6:,.0f} MB, {info.arch}, {info.file_type}) -> {path}")
    return 0
