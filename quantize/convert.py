"""Hugging Face folder -> GGUF, streamed tensor by tensor from memory-mapped safetensors.

Validates config.json, the safetensors headers and every tensor's shape before writing; writes the
header (metadata and tensor infos) first, then each tensor as it is read, so peak memory stays near
the largest tensor. Output goes to a temporary name and is renamed at the end. Pickled checkpoints
(*.bin, *.pt) are never loaded.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
from safetensors import SafetensorError, safe_open

from edgellm.errors import EdgeLLMError
from edgellm.quantize.archs import ARCHS, FLOAT_HPARAMS, HPARAMS, Arch, permute, supported
from edgellm.quantize.vocab import add_vocab

OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
SKIP = ("rotary_emb.inv_freq",)


@dataclass
class Planned:
    hf_name: str
    file: Path
    name: str  # GGUF name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    data: np.ndarray | None = None  # a tensor made from the config, not read from a file


def load_config(model_dir: Path) -> tuple[dict, Arch]:
    path = model_dir / "config.json"
    if not path.exists():
        raise EdgeLLMError(f"{model_dir} has no config.json; is it a Hugging Face model folder?")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise EdgeLLMError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise EdgeLLMError(f"{path} is not a JSON object (it holds a {type(config).__name__})")
    names = config.get("architectures") or []
    if not isinstance(names, list) or not names or not isinstance(names[0], str) or names[0] not in ARCHS:
        shown = names[0] if isinstance(names, list) and names else names or "none"
        raise EdgeLLMError(f"unsupported architecture {shown!r}; supported: {supported()}")
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise EdgeLLMError(f"{path}: {key} is missing or not a positive integer")
    return config, ARCHS[names[0]]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.load / pickle formats: code, not data


def safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = (f" (found {', '.join(pickles)}: pickles are never loaded, since loading one runs its code; "
                "use the repo's .safetensors files, or convert with safetensors' convert.py on a machine you "
                "trust)") if pickles else ""
        raise EdgeLLMError(f"{model_dir} has no .safetensors weights{hint}")
    return files


def expected_shapes(config: dict, arch: Arch) -> dict[str, tuple[int, ...]]:
    """GGUF tensor name suffix -> the (rows, cols) the config implies, for the checks before writing."""
    d, v = config["hidden_size"], config["vocab_size"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    head = config.get("head_dim") or d // n_head
    ff = config.get("intermediate_size")
    out = {"token_embd.weight": (v, d), "output.weight": (v, d), "attn_q.weight": (n_head * head, d),
           "attn_k.weight": (n_kv * head, d), "attn_v.weight": (n_kv * head, d),
           "attn_qkv.weight": ((n_head + 2 * n_kv) * head, d), "attn_output.weight": (d, n_head * head)}
    if ff:
        fused = arch.gguf == gguf.MODEL_ARCH.PHI3  # Phi-3 keeps gate and up in one matrix
        out |= {"ffn_gate.weight": (ff, d), "ffn_up.weight": (2 * ff if fused else ff, d), "ffn_down.weight": (d, ff)}
    return out


SLAB_BYTES = 64 << 20  # a large float tensor is read, converted and written this many input bytes at a time
RAW_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def tensor_entries(file: Path) -> tuple[int, dict]:
    """(where the data starts, the header's entries) of a safetensors file already checked by safe_open."""
    stat = file.stat()
    return _header(file, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _header(file: Path, _mtime_ns: int, _size: int) -> tuple[int, dict]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def read_rows(file: Path, key: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop of a float tensor, read with plain file reads (an mmap would keep every page it
    touched resident while it is open); BF16, which numpy lacks, widened exactly to float32."""
    base, entries = tensor_entries(file)
    entry = entries[key]
    dtype = np.dtype(RAW_DTYPES[entry["dtype"]])
    shape = entry["shape"]
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    stop = min(stop, shape[0]) if shape else 1
    raw = np.fromfile(file, dtype=dtype, count=(stop - start) * row,
                      offset=base + entry["data_offsets"][0] + start * row * dtype.itemsize)
    if entry["dtype"] == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.reshape([stop - start, *shape[1:]] if shape else [])


def read_tensor(file: Path, key: str) -> np.ndarray:
    """One tensor of a safetensors file as numpy; BF16 (which numpy lacks) widened exactly to float32."""
    with safe_open(file, framework="numpy") as handle:  # the header is validated here, before any read
        if handle.get_slice(key).get_dtype() not in RAW_DTYPES:
            return handle.get_tensor(key)
        rows = handle.get_slice(key).get_shape()[:1] or [1]
    return read_rows(file, key, 0, rows[0])


@dataclass
class Slabbed:
    """A 2-D float tensor converted and written in slabs of rows, so a large F32 checkpoint tensor never
    sits in memory whole (Qwen's 151,936 x 896 embedding is 545 MB in F32). GGUFWriter.write_tensor_data
    needs only `nbytes` and `tofile`."""

    file: Path
    key: str
    rows: int
    row_bytes_in: int
    out_dtype: type
    nbytes: int

    def tofile(self, fout) -> None:
        step = max(1, SLAB_BYTES // max(1, self.row_bytes_in))
        for start in range(0, self.rows, step):
            slab = read_rows(self.file, self.key, start, start + step)
            slab.astype(self.out_dtype, copy=False).tofile(fout)


def plan(model_dir: Path, config: dict, arch: Arch, outtype: str) -> list[Planned]:
    tmap = gguf.get_tensor_name_map(arch.gguf, config["num_hidden_layers"])
    shapes = expected_shapes(config, arch)
    tied = config.get("tie_word_embeddings", False)
    out = []
    for file in safetensor_files(model_dir):
        if not file.exists():
            raise EdgeLLMError(f"{file} is listed in the index but missing")
        try:
            with safe_open(file, framework="numpy") as handle:
                shapes_in_file = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as e:
            raise EdgeLLMError(f"{file} is not a valid safetensors file ({e})") from None
        for key, shape in shapes_in_file.items():
            if key.endswith(SKIP) or (tied and key == "lm_head.weight"):
                continue
            name = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise EdgeLLMError(f"{file.name}: tensor {key!r} has no GGUF name for {arch.gguf.name.lower()}")
            suffix = ".".join(name.split(".")[-2:]) if name.startswith("blk.") else name
            if suffix in shapes and shape != shapes[suffix]:
                raise EdgeLLMError(f"{key} has shape {list(shape)} but config.json implies "
                                   f"{list(shapes[suffix])}")
            keep_f32 = len(shape) <= 1 or name.endswith("_norm.weight")
            out.append(Planned(key, file, name, shape, gguf.GGMLQuantizationType.F32 if keep_f32
                               else OUTTYPES[outtype]))
    made = (arch.extra_tensors(config) if arch.extra_tensors else {}).items()  # llama.cpp writes these first
    out = [Planned("", Path(), name, data.shape, gguf.GGMLQuantizationType.F32, data) for name, data in made] + out
    if not any(p.name == "token_embd.weight" for p in out):
        raise EdgeLLMError(f"{model_dir}: no token embedding tensor found")
    return out


def write_metadata(writer: gguf.GGUFWriter, model_dir: Path) -> None:
    """general.* (name, basename, size label, license…) the way llama.cpp's converter derives them."""
    total, shared, expert, experts = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, model_dir, None, total)
    # generation_config.json -> general.sampling.*, the model's own defaults. gguf 0.19 on PyPI reads
    # "penalty_repeat" only; llama.cpp's converter (its newer gguf-py) falls back to transformers' name.
    generation = gguf.Metadata.load_generation_config(model_dir)
    if metadata.sampling_penalty_repeat is None:
        metadata.sampling_penalty_repeat = generation.get("repetition_penalty")
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, experts)
    writer.add_type("model")
    metadata.set_gguf_meta_model(writer)


def write_hparams(writer: gguf.GGUFWriter, config: dict, arch: Arch, outtype: str) -> None:
    writer.add_block_count(config["num_hidden_layers"])
    arch_name = gguf.MODEL_ARCH_NAMES[arch.gguf]
    written = set()

    def put(suffix: str, value: object) -> None:
        key = f"{arch_name}.{suffix}"
        if isinstance(value, float) or suffix in FLOAT_HPARAMS:
            writer.add_float32(key, float(value))
        else:
            writer.add_uint32(key, int(value))
        written.add(suffix)

    for suffix, keys in HPARAMS.items():
        value = next((config[k] for k in keys if config.get(k) is not None), None)
        if value is not None:
            put(suffix, value)
    for suffix, config_key, default in arch.defaults:
        if suffix not in written:
            put(suffix, config.get(config_key, default))
    if arch.extra:
        arch.extra(writer, config)
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if arch.gguf == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head)
    if arch.base_hparams and (arch.head_dim_default or config.get("head_dim") is not None):
        writer.add_key_length(head)
        writer.add_value_length(head)
    writer.add_file_type(FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def slabbed(p: Planned, arch: Arch) -> Slabbed | None:
    """The streaming path for a plain 2-D float tensor written as F32 or F16 (no permutation, no shift)."""
    if p.data is not None or len(p.shape) != 2 or p.qtype not in (gguf.GGMLQuantizationType.F32,
                                                                    gguf.GGMLQuantizationType.F16):
        return None
    if (arch.permute_qk and p.name.endswith(("attn_q.weight", "attn_k.weight"))) or \
            (arch.norm_shift and p.name.endswith("norm.weight")):
        return None
    dtype = tensor_entries(p.file)[1][p.hf_name]["dtype"]
    if dtype not in RAW_DTYPES:
        return None
    out = np.float16 if p.qtype == gguf.GGMLQuantizationType.F16 else np.float32
    row_bytes_in = p.shape[1] * np.dtype(RAW_DTYPES[dtype]).itemsize
    return Slabbed(p.file, p.hf_name, p.shape[0], row_bytes_in, out, p.shape[0] * p.shape[1] * np.dtype(out).itemsize)


def tensor_data(p: Planned, config: dict, arch: Arch) -> np.ndarray | Slabbed:
    # One tensor at a time, read with plain file reads, so memory stays near the largest tensor (or, for
    # plain float tensors, one slab) instead of growing to the whole checkpoint.
    streamed = slabbed(p, arch)
    if streamed is not None:
        return streamed
    w = p.data if p.data is not None else read_tensor(p.file, p.hf_name)
    if arch.norm_shift and p.name.endswith("norm.weight"):
        w = w + w.dtype.type(arch.norm_shift)  # in the checkpoint's dtype, as llama.cpp's converter adds it
    if p.qtype != gguf.GGMLQuantizationType.F16 or w.dtype != np.float16:
        w = w.astype(np.float32, copy=False)  # F16 -> F16 is copied as it is, everything else goes through F32
    if arch.permute_qk and p.name.endswith("attn_q.weight"):
        w = permute(w, config["num_attention_heads"], config["num_attention_heads"])
    elif arch.permute_qk and p.name.endswith("attn_k.weight"):
        w = permute(w, config["num_attention_heads"], config.get("num_key_value_heads"))
    if p.qtype == gguf.GGMLQuantizationType.F32:
        return w
    if p.qtype == gguf.GGMLQuantizationType.F16:
        return w.astype(np.float16, copy=False)
    return gguf.quants.quantize(w, p.qtype)


def convert(model_dir: str | Path, out: str | Path, outtype: str = "f16", force: bool = False,
            progress=None) -> Path:
    """Convert; `progress(done, total)` is called after each tensor. Returns the output path."""
    model_dir, out = Path(model_dir), Path(out)
    if outtype not in OUTTYPES:
        raise EdgeLLMError(f"unknown outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    if out.exists() and not force:
        raise EdgeLLMError(f"{out} exists; pass --force to overwrite it")
    config, arch = load_config(model_dir)
    tmp = out.with_name(f".{out.name}.partial")
    planned = plan(model_dir, config, arch, outtype)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf])
    try:
        for p in planned:
            byte_shape = (p.shape if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
                          else gguf.quants.quant_shape_to_byte_shape(p.shape, p.qtype))
            dtype = {gguf.GGMLQuantizationType.F32: np.float32,
                     gguf.GGMLQuantizationType.F16: np.float16}.get(p.qtype, np.uint8)
            nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(p.name, byte_shape, np.dtype(dtype), nbytes,
                                   raw_dtype=None if dtype != np.uint8 else p.qtype)
        write_metadata(writer, model_dir)
        write_hparams(writer, config, arch, outtype)
        add_vocab(writer, model_dir, config["vocab_size"], arch)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, p in enumerate(planned):
            writer.write_tensor_data(tensor_data(p, config, arch))
            if progress:
                progress(i + 1, len(planned))
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
