"""Sampling settings in force for a model, and where each came from.

In order: the user's flags; the GGUF's `general.sampling.*` keys (what llama.cpp reads as model defaults);
the family table in `model_defaults.toml` (each entry cites its source); llama.cpp's own defaults.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import resources
from typing import Any

from edgellm.gguf_info import ModelInfo
from edgellm.runtime.sampling import SamplingParams

# llama.cpp's common_params_sampling defaults
LLAMA_CPP = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0,
             "repeat_last_n": 64}
GGUF_KEYS = {"temperature": "general.sampling.temp", "top_k": "general.sampling.top_k",
             "top_p": "general.sampling.top_p", "min_p": "general.sampling.min_p",
             "repeat_penalty": "general.sampling.penalty_repeat",
             "repeat_last_n": "general.sampling.penalty_last_n"}
SETTINGS = tuple(LLAMA_CPP)


@dataclass(frozen=True)
class Family:
    name: str
    match: re.Pattern[str]
    source: str
    values: dict[str, Any]
    system: str | None = None


@dataclass(frozen=True)
class Defaults:
    """The settings in force, where each came from (setting -> "flag" | "gguf" | "family: …" | "llama.cpp"),
    and the system prompt to use when the user gives none (None: the template's own)."""

    sampling: SamplingParams
    sources: dict[str, str]
    system: str | None = None
    system_source: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: {"value": getattr(self.sampling, name), "source": self.sources[name]} for name in SETTINGS} \
            | {"system": {"value": self.system, "source": self.system_source}}


@lru_cache(maxsize=1)
def families() -> tuple[Family, ...]:
    data = tomllib.loads(resources.files("edgellm").joinpath("model_defaults.toml").read_text())
    out = []
    for entry in data["family"]:
        values = {k: entry[k] for k in SETTINGS if k in entry}
        out.append(Family(entry["name"], re.compile(entry["match"]), entry["source"], values, entry.get("system")))
    return tuple(out)


def family_of(info: ModelInfo) -> Family | None:
    meta = info.metadata
    key = " ".join(str(meta.get(k) or "") for k in ("general.basename", "general.size_label", "general.name"))
    key = key.strip().lower() or info.path.stem.lower()
    return next((f for f in families() if f.match.search(key)), None)


def resolve_defaults(info: ModelInfo, flags: dict[str, Any] | None = None, seed: int | None = None,
                     system: str | None = None) -> Defaults:
    """`flags`: the settings the user gave (None values count as not given)."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    family = family_of(info)
    values, sources = {}, {}
    for name in SETTINGS:
        gguf_value = info.metadata.get(GGUF_KEYS[name])
        if name in flags:
            values[name], sources[name] = flags[name], "flag"
        elif gguf_value is not None:
            values[name], sources[name] = gguf_value, "gguf"
        elif family is not None and name in family.values:
            values[name], sources[name] = family.values[name], f"{family.name}: {family.source}"
        else:
            values[name], sources[name] = LLAMA_CPP[name], "llama.cpp"
    types = {f.name: f.type for f in fields(SamplingParams)}
    params = SamplingParams(**{k: (int(v) if types[k] == "int" else float(v)) for k, v in values.items()}, seed=seed)
    if system is not None:
        return Defaults(params, sources, system, "flag")
    if family is not None and family.system:
        return Defaults(params, sources, family.system, f"{family.name}: {family.source}")
    return Defaults(params, sources)
