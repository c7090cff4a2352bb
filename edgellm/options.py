"""Command-line options shared by several commands, and their conversion to engine settings."""

from __future__ import annotations

import argparse
from dataclasses import replace

from .engine import KV_TYPES, LoadOptions
from .errors import EdgeLLMError
from .gguf_info import ModelInfo
from .model_defaults import Defaults, resolve_defaults


def add_model_arguments(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="GGUF path, alias (default: smollm2-135m) or Hugging Face repo id")
    else:
        p.add_argument("-m", "--model", default=None,
                       help="GGUF path, alias (default: smollm2-135m) or Hugging Face repo id")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context length in tokens")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=0, help="layers to offload to the GPU")
    p.add_argument("--batch", type=int, default=512, help="prompt batch size")
    p.add_argument("--kv-type", choices=KV_TYPES, default="f16", help="KV cache type (K and V)")
    p.add_argument("--mmap", action="store_true",
                   help="memory-map the weights (default: read them; mmap keeps the file's pages beside the "
                        "repacked copy)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    # None: not given; the model's defaults apply (model_defaults.py)
    p.add_argument("--temp", type=float, default=None, help="temperature; 0 is greedy (default: the model's)")
    p.add_argument("--top-k", type=int, default=None, help="0 turns it off (default: the model's)")
    p.add_argument("--top-p", type=float, default=None, help="(default: the model's)")
    p.add_argument("--min-p", type=float, default=None, help="(default: the model's)")
    p.add_argument("--repeat-penalty", type=float, default=None, help="1.0 is off (default: the model's)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("-n", "--max-tokens", type=int, default=512, help="most tokens to generate")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--draft", default="off", metavar="MODEL|auto|edit|tree|ngram|off",
                   help="speculative decoding: a draft model, auto (edit-aware lookup, plus a local model "
                        "with the target's vocabulary and half its size or less), edit (edit-aware lookup), "
                        "tree (edit-aware lookup with token trees, greedy), ngram (prompt lookup), or off (default)")


def load_options(a: argparse.Namespace) -> LoadOptions:
    if a.ctx is not None and a.ctx < 16:
        raise EdgeLLMError("--ctx must be at least 16")
    tree = getattr(a, "draft", "off") == "tree"  # token trees: one sequence per branch, shared cells
    return LoadOptions(n_ctx=a.ctx, n_threads=a.threads, n_batch=a.batch, n_gpu_layers=a.gpu_layers,
                       type_k=a.kv_type, type_v=a.kv_type, n_seq_max=4 if tree else 1, kv_unified=tree,
                       use_mmap=a.mmap)


# option -> (lowest, highest, inclusive low) allowed
RANGES = {"temp": (0.0, 100.0, True), "top_k": (0, 1 << 30, True), "top_p": (0.0, 1.0, False),
          "min_p": (0.0, 1.0, True), "repeat_penalty": (0.0, 100.0, False), "max_tokens": (1, 1 << 30, True)}


def check_ranges(a: argparse.Namespace) -> None:
    """Refuse out-of-range options instead of running as if they were valid."""
    for name, (low, high, inclusive) in RANGES.items():
        value = getattr(a, name, None)
        if value is None:
            continue
        if not (low <= value <= high) or (not inclusive and value == low):
            bound = f"{'at least' if inclusive else 'above'} {low}" + (f" and at most {high}" if high < 100 else "")
            raise EdgeLLMError(f"--{name.replace('_', '-')} must be {bound} (got {value:g})")


def sampling_defaults(a: argparse.Namespace, info: ModelInfo) -> Defaults:
    """The user's flags, then the model's own defaults (GGUF keys, family table, llama.cpp)."""
    check_ranges(a)
    flags = {"temperature": a.temp, "top_k": a.top_k, "top_p": a.top_p, "min_p": a.min_p,
             "repeat_penalty": a.repeat_penalty}
    defaults = resolve_defaults(info, flags, seed=a.seed, system=getattr(a, "system", None))
    if getattr(a, "draft", "off") != "off" and a.repeat_penalty is None and defaults.sampling.repeat_penalty != 1.0:
        # speculative decoding has no repeat penalty; a model default gives way, a flag is refused later
        defaults = replace(defaults, sampling=replace(defaults.sampling, repeat_penalty=1.0),
                           sources=defaults.sources | {"repeat_penalty": "off: speculative decoding has none"})
    return defaults
