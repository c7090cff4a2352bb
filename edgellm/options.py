"""Command-line options shared by several commands, and their conversion to engine settings."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import ModelInfo
from edgellm.memory.plan import Plan, PlanRequest
from edgellm.model_defaults import Defaults, resolve_defaults
from edgellm.runtime.engine import KV_TYPES, Engine, LoadOptions, default_threads


@dataclass(frozen=True)
class Flags:
    """The defaults of the model and sampling flags of `edgellm run` and `edgellm chat`, in one typed place:
    the parser takes them from here, and a UI plans a load as the CLI would without building a parser."""

    model: str | None = None
    ctx: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None
    batch: int = 512
    kv_type: str | None = None
    mmap: bool = False
    # None: not given; the model's defaults apply (model_defaults.py)
    temp: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    draft: str = "auto"
    rpc: str | None = None  # None: $EDGELLM_RPC, if set
    ram: str | None = None  # None: MemAvailable less a margin

    def namespace(self, **changes) -> argparse.Namespace:
        """These flags, with `changes`, as the parser would give them (the model path as a string)."""
        values = asdict(replace(self, **changes))
        values["stop"] = list(values["stop"])  # as action="append" leaves it
        return argparse.Namespace(**values)


FLAGS = Flags()


def add_model_arguments(p: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        p.add_argument("model", nargs="?", default=FLAGS.model,
                       help="GGUF path, alias (default: smollm2-135m) or Hugging Face repo id")
    else:
        p.add_argument("-m", "--model", default=FLAGS.model,
                       help="GGUF path, alias (default: smollm2-135m) or Hugging Face repo id")
    p.add_argument("-c", "--ctx", type=int, default=FLAGS.ctx, help="context length in tokens")
    p.add_argument("-t", "--threads", type=int, default=FLAGS.threads, help="CPU threads (default: physical cores)")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=FLAGS.gpu_layers,
                   help="layers to offload to the GPU (default: as many as fit)")
    p.add_argument("--batch", type=int, default=FLAGS.batch, help="prompt batch size")
    p.add_argument("--kv-type", choices=KV_TYPES, default=FLAGS.kv_type,
                   help="KV cache type, K and V (default: f16, quantized when f16 does not fit)")
    p.add_argument("--mmap", action="store_true", default=FLAGS.mmap,
                   help="memory-map the weights (default: read them; mmap keeps the file's pages beside the "
                        "repacked copy)")
    add_rpc_arguments(p)


def add_rpc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", default=FLAGS.rpc, metavar="HOST:PORT[,HOST:PORT]",
                   help="llama.cpp RPC workers (`edgellm worker`) for the layers that do not fit here; -ngl N puts N "
                        "layers there (default: $EDGELLM_RPC)")
    p.add_argument("--ram", default=FLAGS.ram, help="host memory to plan for, e.g. 8G (default: MemAvailable less "
                   "a margin)")


def rpc_endpoints(a: argparse.Namespace) -> tuple[str, ...]:
    """--rpc, else $EDGELLM_RPC: the workers, checked as text (reachability is checked before loading)."""
    import os

    from edgellm.runtime.rpc import parse_endpoints

    text = getattr(a, "rpc", None)
    if text is None:
        text = os.environ.get("EDGELLM_RPC", "")
    return tuple(str(e) for e in parse_endpoints(text)) if text.strip() else ()


def ram_budget(a: argparse.Namespace) -> int | None:
    from edgellm.memory.plan import parse_size

    text = getattr(a, "ram", None)
    return parse_size(text) if text else None


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temp", type=float, default=FLAGS.temp, help="temperature; 0 is greedy (default: the model's)")
    p.add_argument("--top-k", type=int, default=FLAGS.top_k, help="0 turns it off (default: the model's)")
    p.add_argument("--top-p", type=float, default=FLAGS.top_p, help="(default: the model's)")
    p.add_argument("--min-p", type=float, default=FLAGS.min_p, help="(default: the model's)")
    p.add_argument("--repeat-penalty", type=float, default=FLAGS.repeat_penalty, help="1.0 is off (default: the model's)")
    p.add_argument("--seed", type=int, default=FLAGS.seed, help="sampling seed (default: random)")
    p.add_argument("-n", "--max-tokens", type=int, default=FLAGS.max_tokens, help="most tokens to generate")
    p.add_argument("--stop", action="append", default=list(FLAGS.stop), help="stop string (repeatable)")
    p.add_argument("--draft", default=FLAGS.draft, metavar="MODEL|auto|edit|tree|ngram|off",
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
                       kv_unified=tree, use_mmap=a.mmap, rpc=rpc_endpoints(a))


LOOKUP_DRAFTS = ("off", "ngram", "edit", "lookup", "tree")  # --draft values that load no draft model


@dataclass(frozen=True)
class DraftChoice:
    """The draft model a --draft choice loads (None: none), and why, in words for `plan` and `run --json`."""

    path: str | None
    reason: str


def choose_draft(target: ModelInfo, spec: str, n_ctx: int | None = None, n_threads: int | None = None,
                 n_gpu_layers: int | None = None) -> DraftChoice:
    """None for lookup drafts. For auto: a local model of the target's vocabulary, trained for the context in
    use, and only when this machine's cost curve says it can pay (a draft that never pays only costs memory)."""
    from edgellm.memory.plan import DEFAULT_CTX
    from edgellm.models import find_draft, resolve

    if spec in LOOKUP_DRAFTS:
        return DraftChoice(None, f"--draft {spec}: no draft model")
    if spec != "auto":
        return DraftChoice(str(resolve(spec)), f"draft model {spec} asked for")
    found = find_draft(target, n_ctx or min(target.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX))
    if found is None:
        return DraftChoice(None, f"no draft model: no local model has {target.name}'s vocabulary at half its size "
                                 "or less; lookup drafts (free) only")
    pays, why = draft_pays(target, found.info, n_threads or default_threads(), n_gpu_layers or 0)
    if not pays:
        return DraftChoice(None, f"draft {found.info.name} not loaded: {why}; lookup drafts (free) only")
    return DraftChoice(str(found.path), f"draft {found.info.name} loaded: {why}")


def draft_pays(target: ModelInfo, draft: ModelInfo, n_threads: int, n_gpu_layers: int) -> tuple[bool, str]:
    """Whether a draft model could beat plain decoding on this machine, even drafting 95% right (policy.could_pay),
    from both models' cost curves (measured or refined here; else their priors, which are pessimistic)."""
    from edgellm.speculative.costs import curve_for, prior_for
    from edgellm.speculative.policy import Policy

    curve = curve_for(target, n_threads, n_gpu_layers)
    draft_curve = curve_for(draft, n_threads, n_gpu_layers)
    if draft_curve.prior:
        # a draft costs memory (+44% RSS for the 0.5B beside the 1.5B): it is loaded only when its own speed here
        # is measured. A prior guessed from its size against a target refined by real timings made a 0.5B look
        # 0.23x of a 1.5B on a 2-core Xeon, and loaded it to draft a handful of tokens
        return False, (f"its cost on this machine is not measured (`edgellm bench {draft.path} --cost-curve` "
                       "measures it)")
    # a target still on its prior is compared on the same footing (both from the file sizes)
    relative = prior_for(draft).t1 / prior_for(target).t1 if curve.prior else draft_curve.t1 / curve.t1
    policy = Policy(curve)
    policy.observe_draft_cost("draft:new", relative * curve.t1)
    source = "prior" if curve.prior else "measured"
    words = (f"it costs {relative:.2f}x the target per token and verifying 2 tokens costs {curve.cost(2):.2f}x one "
             f"({source} cost curve)")
    if policy.could_pay("draft:new"):
        return True, f"{words}: it can pay"
    return False, f"{words}: it cannot pay on this machine"


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

    @property
    def split(self) -> bool:
        """Layers go to RPC workers: the model is held by a child process (remote/split.py)."""
        return bool(self.options.rpc and self.options.n_gpu_layers)

    def replan(self, workers: tuple[str, ...]) -> LoadOptions:
        """The load options planned again with only these RPC workers, the other flags as they were (a split
        model goes on without a lost worker); EdgeLLMError when the rest does not fit."""
        from edgellm.memory.plan import make_plan

        plan = make_plan(self.plan.target.info, replace(self.request, rpc=tuple(workers)))
        return plan.load_options(**{**self.extra, "rpc": tuple(workers)})

    def load_split(self):
        """A model with layers on RPC workers, held by a child process that a lost worker may end: the chat
        goes on without it (remote/split.py)."""
        from edgellm.remote.split import SplitEngine

        return SplitEngine(self.path, self.options, self.replan)

    def acquire(self):
        """The manager's handle on the loaded model (memory.manager.Loaded): release it when done."""
        from edgellm.memory.manager import process_manager

        return process_manager().acquire(self.path, self.request, plan=self.plan, **self.extra)


def planned_chat(path: Path, draft: str = "auto") -> Planned:
    """The plan `edgellm chat PATH --draft DRAFT` makes, with the chat's defaults for every other flag."""
    from edgellm.gguf_info import read_info

    return planned_load(FLAGS.namespace(model=str(path), draft=draft), read_info(path))


def planned_load(a: argparse.Namespace, info: ModelInfo, parallel: int = 1) -> Planned:
    """The options after the memory plan: a KV type, context, GPU layers and draft that fit, or an
    EdgeLLMError with the numbers before anything is loaded."""
    from edgellm.memory.plan import make_plan

    load_options(a)  # the checks on the flags as given
    from edgellm.integrity import check_size

    check_size(info.path)  # a recorded model that changed size is refused before llama.cpp reads it
    spec = getattr(a, "draft", "off")
    choice = choose_draft(info, spec, a.ctx, a.threads, a.gpu_layers)
    rpc = rpc_endpoints(a)
    request = PlanRequest(n_ctx=a.ctx, parallel=parallel, kv_type=a.kv_type, draft=choice.path,
                          speculative=spec != "off", tree=spec == "tree", n_gpu_layers=a.gpu_layers,
                          n_batch=a.batch, ram=ram_budget(a), rpc=rpc)
    plan = make_plan(info, request)
    plan.draft_reason = choice.reason
    extra = {"n_batch": a.batch, "n_threads": a.threads, "use_mmap": a.mmap, "rpc": rpc}
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
