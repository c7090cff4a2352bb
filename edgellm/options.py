"""Command-line options shared by several commands, and their conversion to engine settings."""

from __future__ import annotations

import argparse

from .engine import KV_TYPES, LoadOptions
from .sampling import SamplingParams


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


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    p.add_argument("--temp", type=float, default=d.temperature, help="temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--min-p", type=float, default=d.min_p)
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("-n", "--max-tokens", type=int, default=512, help="most tokens to generate")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--draft", default="off", metavar="MODEL|auto|edit|tree|ngram|off",
                   help="speculative decoding: a draft model, auto (edit-aware lookup, plus the target's "
                        "small sibling when present), edit (edit-aware lookup), tree (edit-aware lookup "
                        "with token trees, greedy), ngram (prompt lookup), or off (default)")


def load_options(a: argparse.Namespace) -> LoadOptions:
    if a.ctx is not None and a.ctx < 16:
        raise SystemExit("edgellm: --ctx must be at least 16")
    tree = getattr(a, "draft", "off") == "tree"  # token trees: one sequence per branch, shared cells
    return LoadOptions(n_ctx=a.ctx, n_threads=a.threads, n_batch=a.batch, n_gpu_layers=a.gpu_layers,
                       type_k=a.kv_type, type_v=a.kv_type, n_seq_max=4 if tree else 1, kv_unified=tree)


def sampling_params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=a.temp, top_k=a.top_k, top_p=a.top_p, min_p=a.min_p,
                          repeat_penalty=a.repeat_penalty, seed=a.seed)
