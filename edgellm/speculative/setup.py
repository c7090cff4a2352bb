"""`--draft MODEL|auto|ngram|edit|off` -> a drafter and its policy for a target engine."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..engine import Engine, LoadOptions, Record
from ..errors import EdgeLLMError
from ..memory.plan import SPECULATIVE_OUTPUTS
from ..models import find_draft, resolve
from ..sampling import SamplingParams
from . import decode
from .costs import load_or_measure
from .drafters import Combined, Drafter, DraftModel, EditAwareLookup, PromptLookup, check_vocab_compatible
from .policy import Policy

TREE_WIDTH = 3  # branches of a token tree: the main draft and two alternatives



@dataclass
class Speculator:
    drafter: Drafter
    policy: Policy
    draft_engine: Engine | None = None
    tree_width: int = 1  # > 1: verify token trees of this many branches (greedy)

    def generate(self, engine: Engine, prompt: Sequence[int], sampling: SamplingParams, max_tokens: int,
                 stop: Sequence[str], cancel: threading.Event | None, ignore_eog: bool) -> Iterator[Record]:
        """The step generator Engine.generate runs when a speculator is given (the engine never imports
        this package)."""
        return decode.generate(engine, prompt, self.drafter, self.policy, sampling, max_tokens, stop, cancel,
                               ignore_eog, self.tree_width)

    def close(self) -> None:
        if self.draft_engine is not None:
            self.draft_engine.close()


def _draft_engine(target: Engine, spec: str, gpu_layers: int | None) -> Engine:
    # as the memory plan sized it (memory.plan.Plan.draft_options): verification-sized outputs for its curve
    layers = target.options.n_gpu_layers if gpu_layers is None else gpu_layers
    draft = Engine(resolve(spec), LoadOptions(n_ctx=target.n_ctx, n_threads=target.n_threads,
                                              n_gpu_layers=layers, n_outputs=SPECULATIVE_OUTPUTS))
    try:
        check_vocab_compatible(target, draft)
    except EdgeLLMError:
        draft.close()
        raise
    return draft


def make_speculator(target: Engine, spec: str | None, max_draft: int = 32,
                    draft_gpu_layers: int | None = None) -> Speculator | None:
    """`spec` as options.planned_load leaves it: a draft model the memory plan has room for, or lookup."""
    spec = (spec or "off").strip()
    if spec == "off":
        return None
    draft_engine = None
    if spec == "ngram":
        drafter: Drafter = PromptLookup()
    elif spec in ("edit", "lookup"):
        drafter = EditAwareLookup()
    elif spec == "tree":
        if target.options.n_seq_max < TREE_WIDTH + 1 or not target.options.kv_unified:
            raise EdgeLLMError("--draft tree needs the target loaded with n_seq_max >= "
                               f"{TREE_WIDTH + 1} and a unified KV cache")
        policy = Policy(load_or_measure(target), max_draft=max_draft)
        return Speculator(EditAwareLookup(), policy, tree_width=TREE_WIDTH)
    elif spec == "auto":
        drafter = EditAwareLookup()
        found = find_draft(target.info)  # a local model with the target's vocabulary, half its size or less
        if found is not None:
            draft_engine = _draft_engine(target, str(found.path), draft_gpu_layers)
            drafter = Combined(drafter, DraftModel(draft_engine))
    else:
        draft_engine = _draft_engine(target, spec, draft_gpu_layers)
        drafter = Combined(EditAwareLookup(), DraftModel(draft_engine))
    policy = Policy(load_or_measure(target), max_draft=max_draft)
    if draft_engine is not None:
        note_draft_cost(policy, draft_engine)
    return Speculator(drafter, policy, draft_engine)


def note_draft_cost(policy: Policy, draft_engine: Engine, name: str = DraftModel.name) -> None:
    """The draft model's cost per token relative to the target's, from both measured cost curves."""
    seconds = load_or_measure(draft_engine).t1
    for state in ("new", "run"):
        policy.observe_draft_cost(f"{name}:{state}", seconds)
