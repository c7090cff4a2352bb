"""GGUF header -> ModelInfo: one fast, validating reader shared by `models`, the engine and the planner.

gguf-py's GGUFReader builds a numpy view per vocabulary string (3 s for SmolLM2's header), so this
walks the header with `struct` and skips large string arrays. Types, sizes and names come from the
`gguf` package's constants. Every count and offset is checked against the file size before any of it
reaches llama.cpp's C loader: a bad file gets a one-line error here, not a crash there.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from edgellm.errors import InvalidModel, ModelNotFound

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_COUNT = 1 << 24  # more tensors or keys than this is a corrupt header, not a model
KEEP_ARRAY_LEN = 1024  # longer string arrays (vocabularies, merges) are counted, not decoded

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # relative to the data section
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelInfo:
    path: Path
    size_bytes: int
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(repr=False)
    data_offset: int = 0  # where the tensor data section starts in the file

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def arch_value(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.arch}.{key}", default)

    @property
    def name(self) -> str:
        return str(self.metadata.get("general.name") or self.path.stem)

    @property
    def n_layer(self) -> int:
        return int(self.arch_value("block_count", 0))

    @property
    def n_embd(self) -> int:
        return int(self.arch_value("embedding_length", 0))

    @property
    def n_head(self) -> int:
        return int(self.arch_value("attention.head_count", 0))

    @property
    def n_head_kv(self) -> int:
        return int(self.arch_value("attention.head_count_kv", self.n_head))

    @property
    def head_dim(self) -> tuple[int, int]:
        """(key length, value length) per head."""
        default = self.n_embd // self.n_head if self.n_head else 0
        return (int(self.arch_value("attention.key_length", default)),
                int(self.arch_value("attention.value_length", default)))

    @property
    def n_ctx_train(self) -> int:
        return int(self.arch_value("context_length", 0))

    @property
    def vocab_size(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return len(tokens) if tokens is not None else int(self.arch_value("vocab_size", 0))

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return str(value) if value else None

    @property
    def vocab_digest(self) -> str | None:
        """A digest of the vocabulary's pieces: models that share it can draft for each other."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return tokens.digest if isinstance(tokens, LargeArray) else None

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def file_type(self) -> str:
        """Quantization name as llama.cpp prints it (Q4_K_M, F16…), else the commonest tensor type."""
        value = self.metadata.get("general.file_type")
        if value is not None:
            try:
                return LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
            except ValueError:
                pass
        weights = Counter(t.type.name for t in self.tensors if len(t.shape) > 1)
        return weights.most_common(1)[0][0] if weights else "unknown"

    @property
    def bits_per_weight(self) -> float:
        data = sum(t.n_bytes for t in self.tensors)
        return 8.0 * data / max(1, self.n_params)


class LargeArray(list):
    """Stands for a long array whose items were skipped: it keeps the length and a digest of the raw
    bytes (two models with the same tokenizer.ggml.tokens digest share a vocabulary)."""

    def __init__(self, length: int, digest: str = "") -> None:
        super().__init__()
        self.length = length
        self.digest = digest

    def __len__(self) -> int:
        return self.length


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> InvalidModel:
        return InvalidModel(f"{self.path} is not a valid GGUF file ({what} at byte {self.pos}); "
                            "re-download or re-convert it")

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail("truncated header")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, self.take(size))[0]

    def count(self, what: str) -> int:
        n = self.scalar("<Q")
        if n > MAX_COUNT:
            raise self.fail(f"implausible {what} count {n}")
        return n

    def string(self) -> str:
        n = self.scalar("<Q")
        if n > len(self.buf):
            raise self.fail(f"string length {n} beyond the file")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.scalar("<Q")
        self.take(n)

    def value(self, vtype: int) -> Any:
        try:
            kind = GGUFValueType(vtype)
        except ValueError:
            raise self.fail(f"unknown value type {vtype}") from None
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            etype = self.scalar("<I")
            n = self.count("array")
            if etype == GGUFValueType.STRING and n > KEEP_ARRAY_LEN:
                start = self.pos
                for _ in range(n):
                    self.skip_string()
                return LargeArray(n, hashlib.blake2b(self.buf[start:self.pos], digest_size=16).hexdigest())
            if etype in _SCALARS:
                fmt = _SCALARS[GGUFValueType(etype)]
                raw = self.take(n * struct.calcsize(fmt))
                return list(struct.unpack_from(f"<{n}{fmt[1]}", raw)) if n <= KEEP_ARRAY_LEN \
                    else LargeArray(n)
            return [self.value(etype) for _ in range(n)]
        return self.scalar(_SCALARS[kind])


def read_info(path: str | Path) -> ModelInfo:
    """Read and validate a GGUF header. Raises ModelNotFound / InvalidModel with a one-line message."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"model file not found: {path}")
    if not path.is_file():
        raise InvalidModel(f"{path} is not a file")
    size = path.stat().st_size
    if size < 24:
        raise InvalidModel(f"{path} is not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise InvalidModel(f"{path} is not a GGUF file (bad magic); pass a .gguf model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                return _parse(view, path, size)
            finally:
                view.release()


def _parse(buf: memoryview, path: Path, size: int) -> ModelInfo:
    cur = _Cursor(buf, path)
    cur.take(4)
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise InvalidModel(f"{path}: GGUF version {version} is not supported (2 or 3 expected)")
    n_tensors = cur.count("tensor")
    n_kv = cur.count("key")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))

    infos = []
    offset_at: dict[str, int] = {}  # where each tensor's data offset is written in the header
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.scalar("<I")
        if not 1 <= n_dims <= 4:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.scalar("<Q") for _ in range(n_dims))
        raw_type = cur.scalar("<I")
        try:
            ttype = GGMLQuantizationType(raw_type)
            block, block_bytes = GGML_QUANT_SIZES[ttype]
        except (ValueError, KeyError):
            raise cur.fail(f"tensor {name!r} has unknown type {raw_type}") from None
        offset_at[name] = cur.pos
        offset = cur.scalar("<Q")
        n = 1
        for d in shape:
            n *= d
        if shape[0] % block:
            raise cur.fail(f"tensor {name!r} row of {shape[0]} is not a multiple of {block}")
        if n_dims == 1 and "norm" in name and ttype != GGMLQuantizationType.F32:
            # converters write norms as F32; llama.cpp aborts the process computing with any other (fuzzed)
            raise cur.fail(f"norm tensor {name!r} is {ttype.name}, not F32")
        infos.append(TensorInfo(name, shape, ttype, offset, n // block * block_bytes))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InvalidModel(f"{path} is not a valid GGUF file (general.alignment {alignment!r} is not a power of "
                           "two); re-download or re-convert it")
    data_start = -(-cur.pos // alignment) * alignment
    end_of_previous, previous = 0, None
    for t in sorted(infos, key=lambda t: t.offset):  # what llama.cpp checks, said with the field's place
        at = offset_at[t.name]
        if t.offset % alignment:
            raise InvalidModel(f"{path} is not a valid GGUF file (tensor {t.name!r} data offset {t.offset} is not "
                               f"a multiple of {alignment}, at byte {at}); re-download or re-convert it")
        if t.offset < end_of_previous:
            raise InvalidModel(f"{path} is not a valid GGUF file (tensor {t.name!r} data at {t.offset} overlaps "
                               f"{previous!r}, at byte {at}); re-download or re-convert it")
        end_of_previous, previous = t.offset + t.n_bytes, t.name
    end = max((data_start + t.offset + t.n_bytes for t in infos), default=data_start)
    if end > size:
        raise InvalidModel(f"{path} is truncated: its tensors need {end:,} bytes but the file has "
                           f"{size:,}; re-download it")
    return ModelInfo(path=path, size_bytes=size, version=version, metadata=metadata, tensors=infos,
                     data_offset=data_start)
