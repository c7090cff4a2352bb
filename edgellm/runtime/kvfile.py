"""A KV sequence on disk: llama_state_seq_save_file plus a note of what it fits.

A state file loads only into a context with the same model, KV types, flash-attention setting and
stream layout, and the file does not name its model; loading a wrong one gives garbage or an abort.
So a JSON note beside it records the model's identity and those settings, and `load` refuses a file
whose note does not match the engine.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
from functools import lru_cache
from pathlib import Path

import llama_cpp as C

from edgellm.errors import EdgeLLMError
from edgellm.runtime.engine import Engine


def safe_name(session: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", session)[:64] + "-" + hashlib.blake2b(session.encode(), digest_size=6).hexdigest()


def model_identity(engine: Engine) -> str:
    """The GGUF's header (names, shapes, types of every tensor; all metadata), its size and a sample of its
    data: two files with equal identities hold the same weights for any practical purpose."""
    info = engine.info
    return _identity(str(info.path), info.data_offset, info.size_bytes, info.path.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _identity(path: str, data_offset: int, size: int, _mtime_ns: int) -> str:
    """Read once per file version: a header with a vocabulary is megabytes, and every swap asks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        h.update(f.read(data_offset))
        f.seek(data_offset + max(0, (size - data_offset) // 2))
        h.update(f.read(1 << 16))
    h.update(str(size).encode())
    return h.hexdigest()


def settings(engine: Engine) -> dict:
    o = engine.options
    return {"model": model_identity(engine), "type_k": o.type_k, "type_v": o.type_v,
            "flash_attn": o.flash_attn, "kv_unified": o.kv_unified, "n_seq_max": o.n_seq_max,
            "n_ctx": engine.n_ctx}


def save(engine: Engine, seq_id: int, tokens: list[int], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".partial")
    arr = (C.llama_token * len(tokens))(*tokens)
    if not C.llama_state_seq_save_file(engine.ctx, str(tmp).encode(), seq_id, arr, len(tokens)):
        tmp.unlink(missing_ok=True)
        raise EdgeLLMError(f"could not save KV sequence {seq_id} to {path}")
    note = path.with_name(path.name + ".json")
    note_tmp = note.with_name(note.name + ".partial")
    # the size too: llama.cpp aborts the process on a file cut short, so a short one never reaches it
    note_tmp.write_text(json.dumps({**settings(engine), "n_tokens": len(tokens), "bytes": tmp.stat().st_size}))
    os.replace(tmp, path)
    os.replace(note_tmp, note)


def load(engine: Engine, seq_id: int, path: Path, capacity: int) -> list[int]:
    """Restore a saved sequence into `seq_id`; EdgeLLMError (nothing loaded) when it does not fit."""
    if not path.is_file():
        raise EdgeLLMError(f"{path} does not exist (a save that never finished leaves only its .partial)")
    note = path.with_name(path.name + ".json")
    try:
        saved = json.loads(note.read_text())
    except (OSError, ValueError) as e:
        raise EdgeLLMError(f"{path} has no readable note of its model and settings; not loaded") from e
    mine = settings(engine)
    wrong = [k for k in mine if saved.get(k) != mine[k]]
    if wrong:
        raise EdgeLLMError(f"{path} was saved with another {', '.join(wrong)}; not loaded")
    if saved.get("bytes") != path.stat().st_size:
        raise EdgeLLMError(f"{path} is {path.stat().st_size:,} bytes, not the {saved.get('bytes')} it was saved "
                           "with (cut short or changed); not loaded")
    if int(saved.get("n_tokens", capacity + 1)) > capacity:
        raise EdgeLLMError(f"{path} holds more tokens than a slot; not loaded")
    tokens = (C.llama_token * capacity)()
    count = ctypes.c_size_t(0)
    if not C.llama_state_seq_load_file(engine.ctx, str(path).encode(), seq_id, tokens, capacity,
                                       ctypes.byref(count)):
        raise EdgeLLMError(f"llama.cpp could not load {path}")
    return list(tokens[:count.value])


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".json").unlink(missing_ok=True)
