"""The dev models a benchmark asked for that are on this machine; a line for each that is not."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from edgellm.errors import ModelNotFound
from edgellm.models import resolve


def present_models(names: Sequence[str]) -> Iterator[tuple[str, Path]]:
    """(name, GGUF path) of each model present; the others are named with how to fetch them."""
    for name in names:
        try:
            yield name, resolve(name)
        except ModelNotFound:
            print(f"{name}: not present (python3 ../shared/dev-models/fetch.py --all)", flush=True)
