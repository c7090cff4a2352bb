"""What `pull` and `quantize` put in place, recorded with its sha256 and size (as Ollama stores by digest).

The manifest is `$EDGELLM_DATA/manifest.json`, written under a temporary name and renamed, with an
advisory lock around read-modify-write. Loading a recorded model checks its size (free: a stat);
`edgellm models verify` checks every digest (sha256 reads the file: ~1.5-2 GB/s here, so a 1 GB model
takes about half a second; not done on every load).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.models import data_dir

CHUNK = 1 << 22


@dataclass(frozen=True)
class Check:
    path: Path
    status: str  # ok | changed | missing
    detail: str = ""


def manifest_path() -> Path:
    return data_dir() / "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


@contextmanager
def _locked() -> Iterator[dict]:
    """The manifest for update; written back atomically when the block ends without an error."""
    path = manifest_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = read()
        yield entries
        tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, path)


def read() -> dict[str, dict]:
    try:
        data = json.loads(manifest_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise EdgeLLMError(f"{manifest_path()} is unreadable ({e}); move it aside to start a new record") from None
    return data if isinstance(data, dict) else {}


def record(path: Path, source: str) -> str:
    """Hash `path` and record it; returns the digest."""
    path = path.resolve()
    digest = sha256(path)
    with _locked() as entries:
        entries[str(path)] = {"sha256": digest, "size": path.stat().st_size, "source": source,
                              "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return digest


def check_size(path: Path) -> None:
    """Refuse a recorded model whose size changed (truncated, overwritten, half-copied)."""
    entry = read().get(str(path.resolve()))
    if entry is None:
        return
    size = path.stat().st_size
    if size != entry["size"]:
        raise EdgeLLMError(f"{path} is {size:,} bytes but was recorded at {entry['size']:,} (corrupted or replaced); "
                           "run `edgellm models verify`, then pull or quantize it again")


def verify() -> list[Check]:
    out = []
    for name, entry in sorted(read().items()):
        path = Path(name)
        if not path.is_file():
            out.append(Check(path, "missing"))
        elif path.stat().st_size != entry["size"]:
            out.append(Check(path, "changed", f"size {path.stat().st_size:,}, recorded {entry['size']:,}"))
        elif sha256(path) != entry["sha256"]:
            out.append(Check(path, "changed", "sha256 differs from the one recorded"))
        else:
            out.append(Check(path, "ok"))
    return out
