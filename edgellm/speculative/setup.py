"""`--draft MODEL|auto|ngram|edit|off` -> a drafter and its policy for a target engine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from edgellm.decoding.emitter import Drafting
from edgellm.decoding.steps import Step, speculative_steps
from edgellm.errors import EdgeLLMError
from edgellm.memory.pressure import MemoryWatch
from edgellm.models import resolve
from edgellm.options import choose_draft
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import Sampler
from edgellm.speculative.costs import keep_refined, load_or_prior
from edgellm.speculative.drafters import Combined, Drafter, DraftModel, EditAwareLookup, PromptLookup, check_vocab_compatible
from edgellm.speculative.policy import Policy

TREE_WIDTH = 3  # branches of a token tree: the main draft and two alternatives



@dataclass
class Speculator:
    drafter: Drafter
    policy: Policy
    draft_engine: Engine | None = None
    tree_width: int = 1  # > 1: verify token trees of this many branches (greedy)
    target: Engine | None = None  # whose cost curve the policy refines (kept on close)
    watch: MemoryWatch | None = None  # memory pressure: drop the draft model when MemAvailable runs low

    def steps(self, engine: Engine, sampler: Sampler, prompt: Sequence[int], drafting: Drafting,
              max_tokens: int) -> Iterator[Step]:
        """The step generator Engine.generate runs when a speculator is given (decoding/stream.py)."""
        return speculative_steps(engine, sampler, prompt, self.drafter, self.policy, drafting, max_tokens,
                                 self.tree_width)

    def relieve(self) -> str | None:
        """Under memory pressure (`watch`) the draft model is dropped between two tokens and the reply goes
        on with lookup drafts."""
        if self.watch is None or self.draft_engine is None or not self.watch.low():
            return None
        return self.drop_draft()

    def drop_draft(self) -> str | None:
        """Unload the draft model and go on with the free lookup drafts (memory pressure); None when
        there is no draft model to drop."""
        if self.draft_engine is None:
            return None
        name = self.draft_engine.info.name
        if isinstance(self.drafter, Combined):
            self.drafter.drop_costly()  # in place: a running generation goes on with the lookup
        self.draft_engine.close()
        self.draft_engine = None
        return f"draft model {name} unloaded"

    def close(self) -> None:
        if self.target is not None:
            keep_refined(self.target, self.policy.curve)
        if self.draft_engine is not None:
            self.draft_engine.close()


def _draft_engine(target: Engine, spec: str, gpu_layers: int | None) -> Engine:
    # as the memory plan sizes it: the draft decodes one token at a time, one logits row
    layers = target.options.n_gpu_layers if gpu_layers is None else gpu_layers
    o = target.options
    n_ctx = target.n_ctx if o.kv_unified else target.n_ctx // o.n_seq_max  # one session's context
    draft = Engine(resolve(spec), LoadOptions(n_ctx=n_ctx, n_threads=target.n_threads,
                                              n_gpu_layers=layers, n_outputs=1))
    try:
        check_vocab_compatible(target, draft)
    except EdgeLLMError:
        draft.close()
        raise
    return draft


def make_speculator(target: Engine, spec: str | None, max_draft: int = 32,
                    draft_gpu_layers: int | None = None, watch: MemoryWatch | None = None) -> Speculator | None:
    """`spec` as options.planned_load leaves it: a draft model the memory plan has room for, or lookup."""
    spec = (spec or "off").strip()
    if spec == "off" or not target.weights.can_drop_tail:  # rejected drafts could not leave its cache
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
        policy = Policy(load_or_prior(target), max_draft=max_draft)
        return Speculator(EditAwareLookup(), policy, tree_width=TREE_WIDTH, target=target, watch=watch)
    elif spec == "auto":  # a draft model only where this machine's cost curve says it can pay
        drafter = EditAwareLookup()
        choice = choose_draft(target.info, "auto", target.n_ctx, target.n_threads, target.options.n_gpu_layers)
        if choice.path is not None:
            draft_engine = _draft_engine(target, choice.path, draft_gpu_layers)
            drafter = Combined(drafter, DraftModel(draft_engine))
    else:
        draft_engine = _draft_engine(target, spec, draft_gpu_layers)
        drafter = Combined(EditAwareLookup(), DraftModel(draft_engine))
    policy = Policy(load_or_prior(target), max_draft=max_draft)
    if draft_engine is not None:
        note_draft_cost(policy, draft_engine)
    return Speculator(drafter, policy, draft_engine, target=target, watch=watch)


def note_draft_cost(policy: Policy, draft_engine: Engine, name: str = DraftModel.name) -> None:
    """The draft model's cost per token relative to the target's, from both cost curves (refined from
    the draft's real timings while decoding)."""
    seconds = load_or_prior(draft_engine).t1
    for state in ("new", "run"):
        policy.observe_draft_cost(f"{name}:{state}", seconds)
