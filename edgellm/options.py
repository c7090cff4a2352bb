"""Command-line options shared by several commands, and their conversion to engine settings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import ModelInfo
from edgellm.memory.plan import Plan, PlanRequest
from edgellm.model_defaults import Defaults, resolve_defaults
from edgellm.runtime.engine import KV_TYPES, Engine, LoadOptions


def add_model_arguments(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=None,
                       help="GGUF path, alias (default: smollm2-135m) or Hugging Face repo id")
    else:
        p.add_argument("-m", "--model", default=None,
                       help="GGUF path, alias (default: smollm2-135m) or Hugging Face repo id")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context length in tokens")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=None,
                   help="layers to offload to the GPU (default: as many as fit)")
    p.add_argument("--batch", type=int, default=512, help="prompt batch size")
    p.add_argument("--kv-type", choices=KV_TYPES, default=None,
                   help="KV cache type, K and V (default: f16, quantized when f16 does not fit)")
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
    p.add_argument("--draft", default="auto", metavar="MODEL|auto|edit|tree|ngram|off",
                   help="speculative decoding: auto (default: edit-aware lookup, which costs nothing and turns "
                        "itself off when it does not pay, plus a local model with the target's vocabulary and "
                        "half its size or less when memory allows), a draft model, edit (lookup only), tree "
                        "(lookup with token trees, greedy), ngram (prompt lookup), or off")


def load_options(a: argparse.Namespace) -> LoadOptions:
    """The options exactly as given (no plan): for tools that measure a fixed configuration."""
    if a.ctx is not None and a.ctx < 16:
        raise EdgeLLMError("--ctx must be at least 16")
    tree = getattr(a, "draft", "off") == "tree"  # token trees: one sequence per branch, shared cells
    return LoadOptions(n_ctx=a.ctx, n_threads=a.threads, n_batch=a.batch, n_gpu_layers=a.gpu_layers or 0,
                       type_k=a.kv_type or "f16", type_v=a.kv_type or "f16", n_seq_max=4 if tree else 1,
                       kv_unified=tree, use_mmap=a.mmap)


LOOKUP_DRAFTS = ("off", "ngram", "edit", "lookup", "tree")  # --draft values that load no draft model


def draft_model_path(target: ModelInfo, spec: str, n_ctx: int | None = None) -> str | None:
    """The draft model a --draft choice loads: none for lookup drafts, a local model of the target's
    vocabulary, trained for the context in use, for auto."""
    from edgellm.memory.plan import DEFAULT_CTX
    from edgellm.models import find_draft, resolve

    if spec in LOOKUP_DRAFTS:
        return None
    if spec == "auto":
        found = find_draft(target, n_ctx or min(target.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX))
        return str(found.path) if found else None
    return str(resolve(spec))


@dataclass(frozen=True)
class Planned:
    """A load decided by the memory plan: engine options, the --draft choice that fits, and why."""

    path: Path
    request: PlanRequest
    plan: Plan
    options: LoadOptions
    draft: str  # the --draft value to use: the plan's draft model's path, or lookup drafts when none fits
    extra: dict = field(default_factory=dict)  # load options the plan does not decide (threads, mmap, batch)

    @property
    def draft_gpu_layers(self) -> int:
        return self.plan.draft.n_gpu_layers if self.plan.draft else 0

    def load(self) -> Engine:
        """The engine, through the process's model manager (shared, budgeted; memory.manager)."""
        return self.acquire().engine

    def acquire(self):
        """The manager's handle on the loaded model (memory.manager.Loaded): release it when done."""
        from edgellm.memory.manager import process_manager

        return process_manager().acquire(self.path, self.request, plan=self.plan, **self.extra)


def planned_chat(path: Path, draft: str = "auto") -> Planned:
    """The plan `edgellm chat PATH --draft DRAFT` makes, with the chat's defaults for every other flag."""
    from edgellm.cli import command_parser
    from edgellm.gguf_info import read_info

    parser, _ = command_parser("chat")
    return planned_load(parser.parse_args([str(path), "--draft", draft]), read_info(path))


def planned_load(a: argparse.Namespace, info: ModelInfo, parallel: int = 1) -> Planned:
    """The options after the memory plan: a KV type, context, GPU layers and draft that fit, or an
    EdgeLLMError with the numbers before anything is loaded."""
    from edgellm.memory.plan import make_plan

    load_options(a)  # the checks on the flags as given
    from edgellm.integrity import check_size

    check_size(info.path)  # a recorded model that changed size is refused before llama.cpp reads it
    spec = getattr(a, "draft", "off")
    request = PlanRequest(n_ctx=a.ctx, parallel=parallel, kv_type=a.kv_type, draft=draft_model_path(info, spec, a.ctx),
                          speculative=spec != "off", tree=spec == "tree", n_gpu_layers=a.gpu_layers,
                          n_batch=a.batch)
    plan = make_plan(info, request)
    extra = {"n_batch": a.batch, "n_threads": a.threads, "use_mmap": a.mmap}
    options = plan.load_options(**extra)
    if plan.draft is not None:
        spec = str(plan.draft.info.path)
    elif spec not in LOOKUP_DRAFTS:
        spec = "edit"  # no draft model (none found, or no room): lookup drafts cost no memory
    return Planned(info.path, request, plan, options, spec, extra)


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
    if getattr(a, "draft", "off") == "tree" and a.repeat_penalty is None and defaults.sampling.repeat_penalty != 1.0:
        # token trees have no repeat penalty; a model default gives way, a flag is refused later
        defaults = replace(defaults, sampling=replace(defaults.sampling, repeat_penalty=1.0),
                           sources=defaults.sources | {"repeat_penalty": "off: token trees have none"})
    return defaults
