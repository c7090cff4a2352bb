"""Per-architecture facts for the converter, as data: GGUF arch, hyper-parameters, tensor transforms."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import MODEL_ARCH

from edgellm.errors import EdgeLLMError


@dataclass(frozen=True)
class Arch:
    gguf: MODEL_ARCH
    permute_qk: bool = False  # llama's rotary layout: HF q/k rows are interleaved differently
    # llama.cpp's converter class for this arch runs the base TextModel.set_gguf_parameters, which writes
    # attention.key_length/value_length whenever config.json has head_dim (conversion/base.py)
    base_hparams: bool = True
    head_dim_default: bool = False  # transformers' config class always has head_dim, given or computed
    norm_shift: float = 0.0  # added to every *norm.weight (Gemma's RMSNorm multiplies by 1 + weight)
    sentencepiece: bool = False  # a tokenizer.model, when there is one, is the tokenizer
    add_space_prefix: bool | None = None  # tokenizer.ggml.add_space_prefix, where the converter writes it
    defaults: tuple[tuple[str, str, object], ...] = ()  # (GGUF suffix, config key, value when missing)
    extra: Callable[[gguf.GGUFWriter, dict], None] | None = None  # hyper-parameters only this arch has
    extra_tensors: Callable[[dict], dict[str, np.ndarray]] | None = None  # tensors made from the config


def rope_params(config: dict) -> dict:
    """rope_scaling (older transformers) or rope_parameters (newer), with rope_theta folded in."""
    return {**(config.get("rope_parameters") or {}), **(config.get("rope_scaling") or {})}


def gemma3_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    if config.get("attn_logit_softcapping") is not None:
        raise EdgeLLMError("config.json: attn_logit_softcapping is set, which Gemma 3 does not have")
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(config["sliding_window"])


def _phi3_rope(config: dict) -> tuple[dict, int, int]:
    rope = rope_params(config)
    orig = config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    if orig is None:
        raise EdgeLLMError("config.json: Phi-3 needs original_max_position_embeddings")
    dims = int(rope.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // config["num_attention_heads"]
    return rope, int(orig), dims


def phi3_hparams(writer: gguf.GGUFWriter, config: dict) -> None:
    rope, orig, dims = _phi3_rope(config)
    writer.add_rope_scaling_orig_ctx_len(orig)
    writer.add_rope_dimension_count(dims)
    writer.add_sliding_window(config.get("sliding_window") or 0)  # 0 tells Phi-4 apart, as llama.cpp does
    if rope.get("long_factor"):  # the 128k models: LongRoPE
        scale = config["max_position_embeddings"] / orig
        kind = (rope.get("rope_type") or rope.get("type") or "").lower()
        if kind in ("su", "longrope"):
            factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
        elif kind == "yarn":
            factor = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise EdgeLLMError(f"config.json: rope scaling {kind or 'without a type'!r} is not supported for Phi-3")
        writer.add_rope_scaling_attn_factors(factor)


def phi3_tensors(config: dict) -> dict[str, np.ndarray]:
    rope, _, dims = _phi3_rope(config)
    if not rope.get("long_factor"):
        return {}
    long, short = rope["long_factor"], rope.get("short_factor") or []
    if len(long) != len(short) or len(long) != dims // 2:
        raise EdgeLLMError(f"config.json: rope long/short factors must have {dims // 2} entries each")
    return {"rope_factors_long.weight": np.array(long, np.float32),
            "rope_factors_short.weight": np.array(short, np.float32)}


# config.json "architectures"[0] -> how to convert it
ARCHS: dict[str, Arch] = {
    # transformers' Llama/Mistral/Qwen3 configs always carry head_dim, so llama.cpp's converter writes it
    "LlamaForCausalLM": Arch(MODEL_ARCH.LLAMA, permute_qk=True, head_dim_default=True, sentencepiece=True),
    "MistralForCausalLM": Arch(MODEL_ARCH.LLAMA, permute_qk=True, head_dim_default=True, sentencepiece=True),
    "Qwen2ForCausalLM": Arch(MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Arch(MODEL_ARCH.QWEN3, head_dim_default=True),
    # Gemma 3 and Phi-3 write their own hyper-parameters (no base class): head_dim only where listed here
    "Gemma3ForCausalLM": Arch(MODEL_ARCH.GEMMA3, base_hparams=False, norm_shift=1.0, sentencepiece=True,
                              add_space_prefix=False,
                              defaults=(("context_length", "max_position_embeddings", 131072),
                                        ("attention.head_count", "num_attention_heads", 8),
                                        ("attention.head_count_kv", "num_key_value_heads", 4),
                                        ("attention.layer_norm_rms_epsilon", "rms_norm_eps", 1e-6),
                                        ("attention.key_length", "head_dim", 256),
                                        ("attention.value_length", "head_dim", 256),
                                        ("rope.freq_base", "rope_theta", 1_000_000.0)),
                              extra=gemma3_hparams),
    "Phi3ForCausalLM": Arch(MODEL_ARCH.PHI3, base_hparams=False, sentencepiece=True, extra=phi3_hparams,
                            extra_tensors=phi3_tensors),
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
    "rope.freq_base_swa": ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                           "rope_local_base_freq"),  # Gemma 3's sliding-window layers
}
FLOAT_HPARAMS = ("rope.freq_base", "rope.freq_base_swa", "attention.layer_norm_rms_epsilon")


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
