"""Per-architecture facts for the converter, as data: GGUF arch, hyper-parameters, tensor transforms."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import MODEL_ARCH


@dataclass(frozen=True)
class Arch:
    gguf: MODEL_ARCH
    permute_qk: bool = False  # llama's rotary layout: HF q/k rows are interleaved differently
    head_dim_keys: bool = False  # write attention.key_length/value_length (explicit head_dim)


# config.json "architectures"[0] -> how to convert it
ARCHS: dict[str, Arch] = {
    # transformers' Llama/Mistral configs always carry head_dim, so llama.cpp's converter writes it
    "LlamaForCausalLM": Arch(MODEL_ARCH.LLAMA, permute_qk=True, head_dim_keys=True),
    "MistralForCausalLM": Arch(MODEL_ARCH.LLAMA, permute_qk=True, head_dim_keys=True),
    "Qwen2ForCausalLM": Arch(MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Arch(MODEL_ARCH.QWEN3, head_dim_keys=True),
}

# GGUF key suffix -> config.json keys to try, in order (all written as <arch>.<suffix>)
HPARAMS: dict[str, tuple[str, ...]] = {
    "context_length": ("max_position_embeddings", "n_ctx", "n_positions"),
    "embedding_length": ("hidden_size", "n_embd"),
    "feed_forward_length": ("intermediate_size", "n_inner"),
    "attention.head_count": ("num_attention_heads", "n_head"),
    "attention.head_count_kv": ("num_key_value_heads", "n_kv_heads"),
    "attention.layer_norm_rms_epsilon": ("rms_norm_eps",),
    "rope.freq_base": ("rope_theta",),
}


def supported() -> str:
    return ", ".join(ARCHS)


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF -> GGUF row order of llama's q/k projections (convert_hf_to_gguf's LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """GGUF -> HF: the inverse of `permute`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
