"""Token bytes -> text that is safe to show: whole UTF-8 characters only, and never part of a stop string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Feed the bytes of each token; get back the text that can be shown now.

    A token can end in the middle of a multi-byte character (emoji, CJK): the incremental decoder
    keeps those bytes until the character is whole. Text that could be the start of a stop string
    is held back until it is clear either way.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stop = [s for s in stop if s]
        self.stopped = False

    def push(self, data: bytes) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(data))

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
