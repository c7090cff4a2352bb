"""The model: weights, vocabulary and chat template, loaded once and shared by every context on it."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp as C

from edgellm import chat_template
from edgellm.errors import InvalidModel
from edgellm.gguf_info import ModelInfo, read_info
from edgellm.runtime import backend
from edgellm.tools.prompt import prepare as prepare_tools


class Model:
    def __init__(self, path: str | Path | ModelInfo, n_gpu_layers: int = 0, use_mmap: bool = False,
                 rpc: Sequence[str] = (), vocab_only: bool = False) -> None:
        """`rpc`: llama.cpp RPC workers (HOST:PORT); the n_gpu_layers go to their devices, each checked first.
        `vocab_only`: the vocabulary and template without the weights (a split model's parent tokenizes)."""
        self.info: ModelInfo = path if isinstance(path, ModelInfo) else read_info(path)  # validated before C
        self.path = self.info.path
        self.n_gpu_layers = n_gpu_layers
        backend.init()
        mparams = C.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # NONE reads the weights into memory: with mmap the file's pages stay resident beside the CPU
        # backend's repacked copy of Q4_0/Q4_K/Q5_K/Q6_K/Q8_0 weights (README "Memory"). With every layer on
        # RPC workers nothing is repacked here, and mmap sends the file's pages as they are: the 1.5B onto a
        # loopback worker in 1.65 s instead of 2.2-2.5 s (README "More than one machine")
        use_mmap = use_mmap or bool(rpc and n_gpu_layers > self.info.n_layer)
        mparams.load_mode = C.LLAMA_LOAD_MODE_MMAP if use_mmap else C.LLAMA_LOAD_MODE_NONE
        mparams.vocab_only = vocab_only
        self._devices = None
        if rpc:
            from edgellm.runtime.rpc import devices_of, parse_endpoints

            handles = devices_of(parse_endpoints(",".join(rpc)))
            self._devices = (ctypes.c_void_p * (len(handles) + 1))(*handles, None)  # NULL-terminated
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        self.ptr = C.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.ptr:
            why = backend.last_error.split(": ", 1)[-1] or "unsupported or corrupt"
            raise InvalidModel(f"llama.cpp could not load {self.path} (architecture {self.info.arch!r}): {why}")
        self.vocab = C.llama_model_get_vocab(self.ptr)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self._piece = ctypes.create_string_buffer(256)
        self._token_bytes: dict[int, bytes] = {}

    # -- tokens and text --------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            buf = (C.llama_token * -n)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, -n, add_special, parse_special)
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        cached = self._token_bytes.get(token) if not special else None
        if cached is not None:
            return cached
        n = C.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:  # a piece longer than the buffer
            self._piece = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        out = self._piece.raw[:n]
        if not special:
            self._token_bytes[token] = out
        return out

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    def special_text(self, token: int) -> str:
        return "" if token < 0 else self.token_bytes(token, special=True).decode("utf-8", "replace")

    @property
    def add_bos(self) -> bool:
        return bool(C.llama_vocab_get_add_bos(self.vocab))

    @property
    def can_drop_tail(self) -> bool:
        """Whether the KV cache can drop its last positions (what rejecting drafted tokens needs): not for a
        recurrent state (Mamba, RWKV) or a hybrid of one."""
        return not (C.llama_model_is_recurrent(self.ptr) or C.llama_model_is_hybrid(self.ptr))

    @property
    def is_chat_model(self) -> bool:
        """A GGUF without a chat template is a base (completion) model."""
        return bool(self.info.chat_template)

    def turn_stops(self) -> list[str]:
        """Text that ends a turn when a model writes it as plain text instead of a special token: the
        markers of the ChatML fallback for a model with no template, the end-of-turn tokens' text otherwise."""
        if not self.is_chat_model:
            return ["<|im_start|>", "<|im_end|>"]
        texts = {self.special_text(C.llama_vocab_eos(self.vocab)), self.special_text(C.llama_vocab_eot(self.vocab))}
        return sorted(t for t in texts if t.strip())

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        """`tools`: OpenAI-shaped function definitions; a template that does not write them gets a
        generic system section (edgellm/tools/prompt.py)."""
        messages, tools = prepare_tools(self.info.chat_template, messages, tools)
        return chat_template.render(
            self.info.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.special_text(C.llama_vocab_bos(self.vocab)),
            eos_token=self.special_text(C.llama_vocab_eos(self.vocab)), tools=tools)

    def chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        text = self.render_chat(messages, tools=tools)
        bos = self.special_text(C.llama_vocab_bos(self.vocab))
        # Templates that write the BOS text themselves must not get a second one from the tokenizer.
        add_special = not (bos and text.startswith(bos))
        return self.tokenize(text, add_special=add_special, parse_special=True)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            C.llama_model_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.close()
