"""The models a request may name: the manager's local list (aliases, models dir, dev models, pulled repos),
never a path from the network."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import ModelInfo, read_info
from edgellm.models import candidates

REFRESH_S = 5.0  # a pull or quantize while serving shows up this soon


class UnknownModel(EdgeLLMError):
    """A request named a model the server does not have (HTTP 404)."""


@dataclass(frozen=True)
class Entry:
    name: str  # what clients send: an alias, a local GGUF's name, or repo:file
    info: ModelInfo
    modified: float  # the file's mtime

    @property
    def path(self) -> Path:
        return self.info.path


class Catalog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._read = 0.0
        # a GGUF header is read once per (file, size, mtime): reading them all (Qwen's holds 152k vocabulary
        # entries) every few seconds took a sixth of the server's CPU from the decode
        self._infos: dict[tuple[Path, int, int], ModelInfo] = {}

    def entries(self) -> list[Entry]:
        with self._lock:
            if time.monotonic() - self._read > REFRESH_S:
                entries: dict[str, Entry] = {}
                infos: dict[tuple[Path, int, int], ModelInfo] = {}
                for name, _, path in candidates():
                    with contextlib.suppress(OSError, EdgeLLMError):  # unreadable, removed, not a model
                        st = path.stat()
                        key = (path.resolve(), st.st_size, st.st_mtime_ns)
                        info = infos[key] = self._infos.get(key) or read_info(path)
                        entries.setdefault(name, Entry(name, info, st.st_mtime))
                self._entries, self._infos, self._read = entries, infos, time.monotonic()
            return list(self._entries.values())

    def find(self, name: str) -> Entry:
        """The entry a client's model name means: exact, without Ollama's ':latest' tag, or a pulled repo id
        that holds one GGUF."""
        entries = {e.name: e for e in self.entries()}
        for candidate in (name, name.removesuffix(":latest")):
            if candidate in entries:
                return entries[candidate]
        repo = [e for n, e in entries.items() if n.partition(":")[0] == name]
        if len(repo) == 1:
            return repo[0]
        raise UnknownModel(f"model {name!r} not found; GET /v1/models lists the models this server has")
