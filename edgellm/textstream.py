"""Token bytes -> text that is safe to show: whole UTF-8 characters only, and never part of a stop string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

REPEATS = 4  # the same line this many times in a row ends a reply: a small model caught in a loop
MIN_REPEATED_LINE = 12  # shorter lines (a closing brace, a table rule) may repeat on purpose


class TextStream:
    """Feed the bytes of each token; get back the text that can be shown now.

    A token can end in the middle of a multi-byte character (emoji, CJK): the incremental decoder
    keeps those bytes until the character is whole. Text that could be the start of a stop string
    is held back until it is clear either way. A reply that writes the same line over and over is
    stopped too (`reason` "repetition").
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stop = [s for s in stop if s]
        self.stopped = False
        self.reason = "stop"  # why it stopped: a stop string, or "repetition"
        self._line = ""
        self._last_line = ""
        self._repeats = 0

    def push(self, data: bytes) -> str:
        if self.stopped:
            return ""
        text = self._release(self._held + self._decoder.decode(data))
        self._watch_lines(text)
        return text

    def _watch_lines(self, text: str) -> None:
        self._line += text
        while "\n" in self._line:
            line, self._line = self._line.split("\n", 1)
            line = line.strip()
            if not line:
                continue  # blank lines between repeats neither count nor break the run
            if line == self._last_line and len(line) >= MIN_REPEATED_LINE:
                self._repeats += 1
            else:
                self._last_line, self._repeats = line, 1
            if self._repeats >= REPEATS and not self.stopped:
                self.stopped, self.reason = True, "repetition"

    def flush(self) -> str:
        """The end of generation: release what was held (a stop string's prefix that never completed)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return self._cut_at_stop(text)

    def _cut_at_stop(self, text: str) -> str:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return text[:min(hits)]
        return text

    def _release(self, text: str) -> str:
        cut = self._cut_at_stop(text)
        if self.stopped:
            self._held = ""
            return cut
        hold = 0
        for s in self.stop:  # the longest tail of `text` that is a head of some stop string
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold]
