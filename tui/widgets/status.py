"""The status bar: speed, time to first token, prompt tokens reused, drafts, memory, KV fill."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from edgellm.decoding.records import Record


def reply_summary(record: Record) -> str:
    s = record.stats
    text = (f"{s.generated_tokens} tokens · {s.decode_tps:.1f} t/s · first token {s.prefill_s * 1000:.0f} ms · "
            f"prompt {s.prompt_tokens} ({s.reused_tokens} reused)")
    if s.drafted_tokens:
        text += f" · draft {s.acceptance:.0%} accepted"
        if s.speedup >= 1.0:  # an estimate against plain decoding; below 1 it says nothing useful
            text += f", ~{s.speedup:.2f}x"
    return f"{text} · {record.finish_words}"


def memory_summary(weights: int, kv: int, draft: int, rss: int, kv_tokens: int, n_ctx: int) -> str:
    mib = 1 << 20
    parts = [f"RAM {rss / mib:,.0f} MiB (weights {weights / mib:,.0f}, KV {kv / mib:,.1f}"]
    if draft:
        parts.append(f", draft {draft / mib:,.0f}")
    return "".join(parts) + f") · KV {kv_tokens:,}/{n_ctx:,} ({kv_tokens / max(n_ctx, 1):.0%})"


class StatusBar(Static):
    """Two lines: the last reply (or what is happening now), and memory in use."""

    def __init__(self, line: str = "", **kwargs) -> None:
        super().__init__(line, **kwargs)
        self.line, self.memory = line, ""

    def show(self, line: str | None = None, memory: str | None = None) -> None:
        if line is not None:
            self.line = line
        if memory is not None:
            self.memory = memory
        self.update(Text.assemble(self.line, "\n", (self.memory, "dim")) if self.memory else Text(self.line))
