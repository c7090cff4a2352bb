"""GGUF -> Hugging Face folder (config.json, model.safetensors, tokenizer files), weights dequantized.

There are no real HF checkpoints on this network; exporting a real GGUF gives the converter real
weights and a real tokenizer to be tested on. The llama q/k permutation is undone, so the folder
looks like what `transformers` would save.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import save_file

from edgellm.errors import EdgeLLMError
from edgellm.quantize.archs import ARCHS, unpermute
from edgellm.quantize.vocab import PRE_TOKENIZERS

HF_ARCH = {a.gguf: name for name, a in reversed(list(ARCHS.items()))}  # first listed name wins
GLOBAL_NAMES = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
BLOCK_NAMES = [f"model.layers.{{i}}.{n}" for n in (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",  # Gemma 3
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")]


def _meta(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items()}


def gguf_to_hf_names(arch: gguf.MODEL_ARCH, n_blocks: int) -> dict[str, str]:
    tmap = gguf.get_tensor_name_map(arch, n_blocks)
    names = GLOBAL_NAMES + [n.format(i=i) for i in range(n_blocks) for n in BLOCK_NAMES]
    out = {}
    for hf in names:
        mapped = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if mapped:
            out[mapped] = hf
    return out


def export(gguf_path: Path, out_dir: Path, dtype: str = "float16", dither: float = 0.0) -> Path:
    """`dither`: Gaussian noise added to every matrix, as a share of each row's standard deviation.

    Dequantized weights sit on their quantization grid, and a finer type of the same family can hold
    that grid exactly (Q5_1 holds Q4_1's: 0.02% error instead of 4.6%), which flatters whichever
    quantizer picks it. Comparisons of quantizers use dithered exports: no grid survives, the weights
    look like a trained checkpoint's to every type alike (the F16 reference carries the same noise).
    """
    rng = np.random.default_rng(0)
    reader = gguf.GGUFReader(gguf_path)
    meta = _meta(reader)
    arch_name = meta["general.architecture"]
    arch = next((a for a in gguf.MODEL_ARCH if gguf.MODEL_ARCH_NAMES[a] == arch_name), None)
    if arch not in HF_ARCH:
        raise EdgeLLMError(f"export supports {', '.join(gguf.MODEL_ARCH_NAMES[a] for a in HF_ARCH)}, "
                           f"not {arch_name}")
    hp = lambda key, default=None: meta.get(f"{arch_name}.{key}", default)  # noqa: E731
    n_blocks, n_head = int(hp("block_count")), int(hp("attention.head_count"))
    n_head_kv = int(hp("attention.head_count_kv", n_head))
    names = gguf_to_hf_names(arch, n_blocks)
    permute = ARCHS[HF_ARCH[arch]].permute_qk
    shift = ARCHS[HF_ARCH[arch]].norm_shift

    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name not in names:
            raise EdgeLLMError(f"export: no Hugging Face name for tensor {t.name}")
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if permute and t.name.endswith("attn_q.weight"):
            w = unpermute(w, n_head, n_head)
        elif permute and t.name.endswith("attn_k.weight"):
            w = unpermute(w, n_head, n_head_kv)
        elif shift and t.name.endswith("norm.weight"):
            w = w - np.float32(shift)
        if dither and w.ndim == 2:
            w = w + rng.standard_normal(w.shape, dtype=np.float32) * (dither * w.std(axis=1, keepdims=True))
        tensors[names[t.name]] = w.astype(np.float32 if w.ndim == 1 else np.dtype(dtype))

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    config = {
        "architectures": [HF_ARCH[arch]], "model_type": arch_name, "torch_dtype": dtype,
        "hidden_size": int(hp("embedding_length")), "intermediate_size": int(hp("feed_forward_length")),
        "num_hidden_layers": n_blocks, "num_attention_heads": n_head, "num_key_value_heads": n_head_kv,
        "max_position_embeddings": int(hp("context_length")), "rms_norm_eps": float(hp("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(hp("rope.freq_base", 10000.0)), "vocab_size": len(tokens),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"], "unk_token_id": ids["unknown"],
    }
    if arch == gguf.MODEL_ARCH.GEMMA3:  # transformers' Gemma3TextConfig
        head_dim = int(hp("attention.key_length"))
        config |= {"model_type": "gemma3_text", "head_dim": head_dim, "query_pre_attn_scalar": head_dim,
                   "sliding_window": int(hp("attention.sliding_window")), "sliding_window_pattern": 6,
                   "rope_local_base_freq": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
                   "final_logit_softcapping": hp("final_logit_softcapping"), "attn_logit_softcapping": None}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(meta, out_dir, ids)
    return out_dir


def _write_sentencepiece(meta: dict[str, Any], out_dir: Path, ids: dict[str, int | None]) -> None:
    """tokenizer.model (a SentencePiece BPE model with byte fallback) from the GGUF's pieces, scores, types."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    proto = spm.ModelProto()
    tokens, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    for token, score, kind in zip(tokens, scores, types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score = token, score
        # GGUF's token types are SentencePiece's numbers; user-defined ones come back via added_tokens_decoder
        piece.type = kind if kind != gguf.TokenType.USER_DEFINED else gguf.TokenType.NORMAL
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = spm.TrainerSpec.BPE, len(tokens), True
    spec.unk_id, spec.bos_id, spec.eos_id = ids["unknown"] or 0, ids["bos"] or -1, ids["eos"] or -1
    spec.pad_id = ids["padding"] if ids["padding"] is not None else -1
    norm = proto.normalizer_spec
    norm.name, norm.escape_whitespaces, norm.remove_extra_whitespaces = "identity", True, False
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    (out_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    user_defined = {str(i): {"content": t, "special": False} for i, (t, k) in enumerate(zip(tokens, types, strict=True))
                    if k == gguf.TokenType.USER_DEFINED}
    _write_tokenizer_config(meta, out_dir, ids, {"added_tokens_decoder": user_defined} if user_defined else {})


def _write_tokenizer_config(meta: dict[str, Any], out_dir: Path, ids: dict[str, int | None],
                            extra: dict[str, Any]) -> None:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    name = lambda i: tokens[i] if i is not None else None  # noqa: E731
    model = meta.get("tokenizer.ggml.model")
    config = {"tokenizer_class": "PreTrainedTokenizerFast" if model == "gpt2" else "GemmaTokenizer",
              "bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]), "unk_token": name(ids["unknown"]),
              "pad_token": name(ids["padding"]),
              "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
              "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)), **extra}
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _write_tokenizer(meta: dict[str, Any], out_dir: Path, ids: dict[str, int | None]) -> None:
    if meta.get("tokenizer.ggml.model") == "llama":
        _write_sentencepiece(meta, out_dir, ids)
        return
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta["tokenizer.ggml.token_type"]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if meta.get("tokenizer.ggml.model") != "gpt2" or pre not in PRE_TOKENIZERS:
        raise EdgeLLMError(f"export supports byte-level BPE with pre-tokenizer {', '.join(PRE_TOKENIZERS)}, "
                           f"not {meta.get('tokenizer.ggml.model')}/{pre}")
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty != gguf.TokenType.UNUSED}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": ty == gguf.TokenType.CONTROL}
             for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
             if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": byte_level,
        "decoder": {**byte_level, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": list(meta.get("tokenizer.ggml.merges", []))},
    }
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    _write_tokenizer_config(meta, out_dir, ids, {})
