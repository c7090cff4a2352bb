import struct
from pathlib import Path

import pytest

from edgellm.errors import InvalidModel, ModelNotFound
from edgellm.gguf_info import read_info


def test_reads_smollm2_header(smollm2: Path):
    info = read_info(smollm2)
    assert info.arch == "llama"
    assert (info.n_layer, info.n_head, info.n_head_kv, info.n_embd) == (30, 9, 3, 576)
    assert info.n_ctx_train == 8192
    assert info.vocab_size == 49152
    assert info.file_type == "Q4_1"
    assert 134e6 < info.n_params < 136e6
    assert info.chat_template and "<|im_start|>" in info.chat_template


def test_missing_file(tmp_path: Path):
    with pytest.raises(ModelNotFound, match="not found"):
        read_info(tmp_path / "nope.gguf")


def test_text_file_named_gguf(tmp_path: Path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are my notes, not a model\n" * 10)
    with pytest.raises(InvalidModel, match="bad magic"):
        read_info(path)


def test_truncated_file(tmp_path: Path, smollm2: Path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(smollm2.read_bytes()[:5_000_000])
    with pytest.raises(InvalidModel, match="truncated"):
        read_info(path)


def test_header_cut_inside_metadata(tmp_path: Path, smollm2: Path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(smollm2.read_bytes()[:1000])
    with pytest.raises(InvalidModel, match="truncated header"):
        read_info(path)


def test_implausible_tensor_count(tmp_path: Path, smollm2: Path):
    data = bytearray(smollm2.read_bytes()[:4096])
    struct.pack_into("<Q", data, 8, 1 << 40)
    path = tmp_path / "huge.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidModel, match="implausible tensor count"):
        read_info(path)
