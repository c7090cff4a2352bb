"""Tokenizer -> GGUF tokenizer metadata, the way llama.cpp's converter does it.

Two kinds: byte-level BPE from tokenizer.json (Qwen, SmolLM2, Llama 3), and SentencePiece from
tokenizer.model (Gemma, Phi-3, Llama 2), read with the `sentencepiece` library. BPE tokens and their
types follow `convert_hf_to_gguf.py`'s `get_vocab_base`, SentencePiece ones its
`_create_vocab_sentencepiece`; merges, special token ids,
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
from edgellm.quantize.archs import Arch

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


def spm_tokens(model_dir: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types from tokenizer.model, then added tokens; padded to vocab_size."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    except (OSError, RuntimeError) as e:
        raise EdgeLLMError(f"{model_dir}/tokenizer.model is not a SentencePiece model ({e})") from None
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                else gguf.TokenType.NORMAL)
        tokens[i], scores[i], types[i] = sp.IdToPiece(i), sp.GetScore(i), kind
    added_file = model_dir / "added_tokens.json"
    added = json.loads(added_file.read_text(encoding="utf-8")) if added_file.exists() else {}
    for token, i in added.items():
        if i < vocab_size:
            tokens[i], scores[i], types[i] = token, -1000.0, gguf.TokenType.USER_DEFINED
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    for key, entry in config.get("added_tokens_decoder", {}).items():
        i, token = int(key), entry["content"]
        if i >= vocab_size:
            continue
        if entry.get("special") or looks_special(token):
            types[i] = gguf.TokenType.CONTROL
        else:
            token = token.replace("\u2581", " ")  # user-defined spaces are stored pre-normalized
            types[i] = gguf.TokenType.USER_DEFINED
        tokens[i], scores[i] = token, -1000.0
    return tokens, scores, types


def uses_sentencepiece(model_dir: Path, arch: Arch) -> bool:
    if not arch.sentencepiece or not (model_dir / "tokenizer.model").exists():
        return False
    config_file = model_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    return config.get("tokenizer_class") != "GPT2Tokenizer"  # Phi-4 ships both and means BPE


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int, arch: Arch) -> None:
    if uses_sentencepiece(model_dir, arch):
        tokens, scores, types = spm_tokens(model_dir, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(model_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        if arch.add_space_prefix is not None:
            writer.add_add_space_prefix(arch.add_space_prefix)
        return
    path = model_dir / "tokenizer.json"
    if not path.exists():
        what = "tokenizer.json or tokenizer.model" if arch.sentencepiece else "tokenizer.json"
        raise EdgeLLMError(f"{model_dir} has no {what}; a tokenizer is needed to convert")
    tokens, types = bpe_tokens(model_dir, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
