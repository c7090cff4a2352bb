"""tokenizer.json (byte-level BPE) -> GGUF tokenizer metadata, the way llama.cpp's converter does it.

Tokens and their types follow `convert_hf_to_gguf.py`'s `get_vocab_base`; merges, special token ids,
add-BOS/EOS flags and the chat template come from gguf-py's `SpecialVocab`. The pre-tokenizer name
is found like llama.cpp finds it: the ids of a fixed check text, encoded by the model's own tokenizer
(the `tokenizers` library, which transformers' fast tokenizers are), hashed and looked up.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf

from edgellm.errors import EdgeLLMError

# convert_hf_to_gguf.py's check text for pre-tokenizers (get_vocab_base_pre)
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

# sha256 of the check text's ids -> llama.cpp pre-tokenizer name (from convert_hf_to_gguf.py)
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
}

# The tokenizer.json parts that make each pre-tokenizer (used to export a GGUF back to an HF folder).
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = {
    "smollm": (None, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, BYTE_LEVEL]}),
    "qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
        {**BYTE_LEVEL, "trim_offsets": False, "use_regex": False}]}),
}


def looks_special(token: str) -> bool:
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (
        token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def pre_tokenizer_name(tokenizer_json: Path) -> str:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode(CHECK_TEXT).ids
    digest = sha256(str(ids).encode()).hexdigest()
    if digest not in PRE_BY_HASH:
        raise EdgeLLMError(f"{tokenizer_json}: unknown BPE pre-tokenizer (check hash {digest[:12]}…); "
                           f"supported: {', '.join(sorted(set(PRE_BY_HASH.values())))}")
    return PRE_BY_HASH[digest]


def bpe_tokens(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token texts and types in id order, padded to vocab_size with [PADn] like llama.cpp's converter."""
    data = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise EdgeLLMError(f"{model_dir}/tokenizer.json: tokenizer type {model.get('type')!r} is not "
                           "supported yet (byte-level BPE is)")
    reverse = {i: t for t, i in model["vocab"].items()}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    for i, t in added.items():
        reverse[i] = t["content"]
    if reverse and max(reverse) >= vocab_size:
        raise EdgeLLMError(f"{model_dir}: tokenizer has id {max(reverse)} but config vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if added[i].get("special") or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise EdgeLLMError(f"{model_dir} has no tokenizer.json; a tokenizer is needed to convert")
    tokens, types = bpe_tokens(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
