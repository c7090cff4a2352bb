"""Typed settings of one conversation: its system prompt, sampling and draft, stored with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from edgellm.runtime.sampling import SamplingParams

DRAFT_CHOICES = ("auto", "edit", "off")  # and any local model that shares the target's vocabulary


@dataclass(frozen=True)
class ChatSettings:
    system: str | None = None
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    draft: str = "auto"

    @classmethod
    def from_sampling(cls, sampling: SamplingParams, system: str | None, max_tokens: int,
                      draft: str = "auto") -> ChatSettings:
        return cls(system, sampling.temperature, sampling.top_k, sampling.top_p, sampling.min_p,
                   sampling.repeat_penalty, max_tokens, draft)

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                              min_p=self.min_p, repeat_penalty=self.repeat_penalty)

    def as_dict(self) -> dict:
        return asdict(self)

    def merged(self, stored: dict) -> ChatSettings:
        """These settings with a conversation's stored ones on top (unknown keys ignored)."""
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in stored.items() if k in names})
