"""Structured mutations of a real GGUF file: where each field is, and the ways a file goes wrong there.

`fields(data)` walks the header (as gguf_info does) and records each field's offset, width and kind;
`tensors(data)` finds each tensor's data; `mutations(data, n, seed)` yields (description, bytes):
truncation at every section boundary, bit flips in counts, lengths, types, dimensions and offsets, huge
counts, absurd dimensions, misaligned and overlapping tensor data, a tensor past the end, bad UTF-8 in
keys and names, wrong value types, and weights overwritten with NaN or ±inf (a valid header whose model
computes non-finite logits: DAMAGED_WEIGHTS starts their descriptions).
"""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
F32, F16, Q8_0, BF16 = 0, 1, 8, 30  # ggml tensor types whose every value can be made NaN or ±inf
DAMAGED_WEIGHTS = "non-finite weights: "


@dataclass(frozen=True)
class Field:
    offset: int
    width: int
    kind: str  # count | length | vtype | ndims | dim | ttype | toffset | text | boundary


def fields(data: bytes) -> list[Field]:
    out: list[Field] = []
    pos = 8  # magic, version

    def u(fmt: str, kind: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        out.append(Field(pos, struct.calcsize(fmt), kind))
        pos += struct.calcsize(fmt)
        return value

    def string(kind: str = "text") -> None:
        nonlocal pos
        n = u("<Q", "length")
        out.append(Field(pos, n, kind))
        pos += n

    def value(vtype: int) -> None:
        nonlocal pos
        if vtype == STRING:
            string()
        elif vtype == ARRAY:
            etype = u("<I", "vtype")
            n = u("<Q", "count")
            for _ in range(n):
                value(etype)
        else:
            pos += SCALAR_SIZES[vtype]

    n_tensors = u("<Q", "count")
    n_kv = u("<Q", "count")
    out.append(Field(pos, 0, "boundary"))
    for _ in range(n_kv):
        string()
        value(u("<I", "vtype"))
        out.append(Field(pos, 0, "boundary"))
    for _ in range(n_tensors):
        string()
        dims = u("<I", "ndims")
        for _ in range(dims):
            u("<Q", "dim")
        u("<I", "ttype")
        u("<Q", "toffset")
        out.append(Field(pos, 0, "boundary"))
    return out


@dataclass(frozen=True)
class Tensor:
    name: str
    ttype: int
    n_elements: int
    offset: int  # of its data, from the start of the file


def tensors(data: bytes) -> list[Tensor]:
    pos = 8

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n:pos].decode()

    def value(vtype: int) -> object:
        nonlocal pos
        if vtype == STRING:
            return text()
        if vtype == ARRAY:
            etype, count = take("<I"), take("<Q")
            for _ in range(count):
                value(etype)
            return None
        pos += SCALAR_SIZES[vtype]
        return int.from_bytes(data[pos - SCALAR_SIZES[vtype]:pos], "little")

    n_tensors, n_kv = take("<Q"), take("<Q")
    kv = {text(): value(take("<I")) for _ in range(n_kv)}
    infos = []
    for _ in range(n_tensors):
        name = text()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, take("<I"), math.prod(dims), take("<Q")))
    align = kv.get("general.alignment") or 32
    start = -(-pos // align) * align  # tensor data begins at the first aligned byte after the header
    return [Tensor(name, ttype, n, start + offset) for name, ttype, n, offset in infos]


def non_finite(t: Tensor, special: float) -> bytes | None:
    """Every value of tensor `t` made `special` (NaN, inf or -inf) in its own type: a whole norm vector or
    embedding, so that every logit comes out non-finite (one value could vanish in quantized matmuls)."""
    if t.ttype == F32:
        return struct.pack("<f", special) * t.n_elements
    if t.ttype == F16:
        return struct.pack("<e", special) * t.n_elements
    if t.ttype == BF16:
        return struct.pack("<f", special)[2:] * t.n_elements
    if t.ttype == Q8_0:  # blocks of a float16 scale and 32 int8: the scale makes every value non-finite
        return (struct.pack("<e", special) + bytes([1] * 32)) * (t.n_elements // 32)
    return None


def mutations(data: bytes, n: int, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    rng = random.Random(seed)
    # the last norm and the embeddings first (every model has them), then the others; NaN, inf, -inf in turn
    weights = [t for t in tensors(data) if non_finite(t, math.nan) is not None
               and (t.name.endswith("norm.weight") or t.name == "token_embd.weight")]
    rng.shuffle(weights)
    weights.sort(key=lambda t: t.name not in ("output_norm.weight", "token_embd.weight"))
    damaged = [(t, special) for t in weights for special in (math.nan, math.inf, -math.inf)]
    found = fields(data)
    boundaries = [f.offset for f in found if f.kind == "boundary"]
    by_kind: dict[str, list[Field]] = {}
    for f in found:
        by_kind.setdefault(f.kind, []).append(f)
    header_end = boundaries[-1]

    def put(buf: bytearray, f: Field, value: int) -> None:
        buf[f.offset:f.offset + f.width] = (value & ((1 << (8 * f.width)) - 1)).to_bytes(f.width, "little")

    for i in range(n):
        buf = bytearray(data)
        kind = i % 11
        if kind == 0:  # truncation at a section boundary (or just before or after one)
            at = rng.choice(boundaries) + rng.choice((-1, 0, 1, 7))
            yield f"truncated at byte {at}", bytes(buf[:max(at, 0)])
            continue
        if kind == 1:  # a bit flipped in a count, length, type, dimension or offset
            f = rng.choice(found[:-1] if found[-1].kind == "boundary" else found)
            while f.width == 0 or f.kind == "text":
                f = rng.choice(found)
            bit = rng.randrange(8 * f.width)
            buf[f.offset + bit // 8] ^= 1 << (bit % 8)
            yield f"bit {bit} of the {f.kind} at byte {f.offset}", bytes(buf)
            continue
        if kind == 2:
            f = rng.choice(by_kind["count"] + by_kind["length"])
            put(buf, f, rng.choice((2**64 - 1, 2**63, 2**32, 10**12)))
            yield f"huge {f.kind} at byte {f.offset}", bytes(buf)
            continue
        if kind == 3:
            f = rng.choice(by_kind["dim"])
            put(buf, f, rng.choice((0, 2**64 - 1, 2**63 + 5, 3, 10**15)))
            yield f"absurd dimension at byte {f.offset}", bytes(buf)
            continue
        if kind == 4:
            f = rng.choice(by_kind["toffset"])
            put(buf, f, int.from_bytes(buf[f.offset:f.offset + 8], "little") + rng.choice((1, 7, 31)))
            yield f"misaligned tensor offset at byte {f.offset}", bytes(buf)
            continue
        if kind == 5:
            offsets = by_kind["toffset"]
            a, b = rng.sample(offsets, 2) if len(offsets) > 1 else (offsets[0], offsets[0])
            buf[a.offset:a.offset + 8] = buf[b.offset:b.offset + 8]
            yield f"tensor data overlapping (offset at byte {a.offset} copied from {b.offset})", bytes(buf)
            continue
        if kind == 6:
            f = rng.choice(by_kind["toffset"])
            put(buf, f, len(data) * rng.choice((1, 2, 1000)))
            yield f"a tensor past the end (offset at byte {f.offset})", bytes(buf)
            continue
        if kind == 7:
            texts = [f for f in by_kind["text"] if f.width and f.offset < header_end]
            f = rng.choice(texts)
            at = f.offset + rng.randrange(f.width)
            buf[at] = rng.choice((0xFF, 0xC3, 0x80, 0xED))
            yield f"bad UTF-8 at byte {at}", bytes(buf)
            continue
        if kind == 8:
            f = rng.choice(by_kind["vtype"] + by_kind["ttype"])
            put(buf, f, rng.choice((13, 99, 2**31, 2**32 - 1, 4, 8, 9)))
            yield f"wrong {f.kind} at byte {f.offset}", bytes(buf)
            continue
        if kind == 9:  # dimension counts out of range
            f = rng.choice(by_kind["ndims"])
            put(buf, f, rng.choice((0, 5, 255, 2**32 - 1)))
            yield f"{buf[f.offset]} dimensions at byte {f.offset}", bytes(buf)
            continue
        # kind 10: a valid file whose weights hold NaN or ±inf (a damaged download, a broken conversion)
        t, special = damaged[(i // 11) % len(damaged)]
        values = non_finite(t, special)
        buf[t.offset:t.offset + len(values)] = values
        yield f"{DAMAGED_WEIGHTS}{special} in all of {t.name} at byte {t.offset}", bytes(buf)
