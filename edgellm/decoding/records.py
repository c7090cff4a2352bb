"""What a stream of decoding yields: records, each with a snapshot of the reply's statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    prompt_tokens: int = 0  # tokens in the prompt
    prefilled_tokens: int = 0  # of those, decoded now (the rest were already in the KV cache)
    generated_tokens: int = 0
    drafted_tokens: int = 0  # proposed by a drafter (speculative decoding)
    accepted_tokens: int = 0  # of those, accepted by the target
    draft_steps: int = 0  # verifications that carried a draft
    plain_estimate_s: float = 0.0  # what plain decoding would have taken (speculative: from the cost curve)
    prefill_s: float = 0.0
    decode_s: float = 0.0  # from the first sampled token to the last

    @property
    def reused_tokens(self) -> int:
        return self.prompt_tokens - self.prefilled_tokens

    @property
    def prefill_tps(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of the prefill; the decode phase makes the others
        n = self.generated_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def speedup(self) -> float:
        """Estimated speedup over plain decoding (speculative decoding only; 0 otherwise)."""
        return self.plain_estimate_s / self.decode_s if self.plain_estimate_s and self.decode_s else 0.0

    @property
    def mean_accepted(self) -> float:
        """Drafted tokens accepted per verification that carried a draft."""
        return self.accepted_tokens / self.draft_steps if self.draft_steps else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {
            "prompt_tokens": self.prompt_tokens, "prefilled_tokens": self.prefilled_tokens,
            "reused_tokens": self.reused_tokens, "generated_tokens": self.generated_tokens,
            "drafted_tokens": self.drafted_tokens, "accepted_tokens": self.accepted_tokens,
            "draft_steps": self.draft_steps, "acceptance": round(self.acceptance, 4),
            "mean_accepted": round(self.mean_accepted, 2), "speedup": round(self.speedup, 3),
            "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
            "prefill_tps": round(self.prefill_tps, 2), "decode_tps": round(self.decode_tps, 2),
        }


# why a reply ended, in words for a status line
FINISH_WORDS = {"eog": "end of turn", "stop": "stop string", "repetition": "stopped: repeating itself",
                "length": "token limit", "context": "context full", "cancelled": "stopped", "error": "error"}


@dataclass(frozen=True)
class Record:
    """One step of a stream: the text it adds (may be empty mid-character), and the stats at that point."""

    text: str
    token: int | None
    stats: Stats  # a snapshot: later records do not change it
    from_draft: bool = False
    # set on the last record: "eog" | "stop" | "repetition" | "length" | "context" | "cancelled" | "error"
    finish_reason: str | None = None
    event: str | None = None  # a notice for the user beside the text (memory pressure): stderr, status line

    @property
    def finish_words(self) -> str:
        """Why the reply ended, in words for a status line ("" mid-stream)."""
        return FINISH_WORDS.get(self.finish_reason or "", self.finish_reason or "")
