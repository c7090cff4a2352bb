"""The engine: one model and one context on llama-cpp-python's low-level API.

Used by the CLI, the chat and the benchmarks alike. `generate` yields small records (text, token,
stats) as tokens are decoded. The KV cache is kept between calls: a prompt that starts like the last
one (the next turn of a chat) prefills only the tokens that are new.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as C
import numpy as np
from gguf import GGMLQuantizationType

from edgellm.decoding.records import Record
from edgellm.decoding.stream import Speculating, stream_generate
from edgellm.errors import CacheTrimError, EdgeLLMError
from edgellm.gguf_info import read_info
from edgellm.runtime.context import KVSequence, TokenBatch, common_prefix
from edgellm.runtime.model import Model
from edgellm.runtime.probe import KV_TYPES, ContextShape
from edgellm.runtime.sampling import SamplingParams, logits_row

DEFAULT_CTX = 4096


def default_threads() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


@dataclass(frozen=True)
class LoadOptions:
    n_ctx: int | None = None  # None: min(model's training context, DEFAULT_CTX)
    n_threads: int | None = None  # None: physical cores
    n_batch: int = 512
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool | None = None  # None: llama.cpp decides
    n_seq_max: int = 1
    kv_unified: bool = False  # one KV buffer shared by all sequences (token trees share their prefix)
    # Most logits rows one batch may ask for; 0 = n_batch (llama.cpp's default). The compute buffer is
    # reserved for this many rows of the vocabulary: Qwen 0.5B 300 MiB at 512 rows, 40 MiB at 1.
    n_outputs: int = 0
    # False: weights are read into memory (llama.cpp's LLAMA_LOAD_MODE_NONE). With mmap the file's pages
    # stay resident beside the CPU backend's repacked copy of Q4_0/Q4_K/Q5_K/Q6_K/Q8_0 weights: the 1.5B's
    # peak RSS 1,949 MiB instead of 1,353, at the same prefill and decode speed (README).
    use_mmap: bool = False
    eval_callback: object = None  # a ggml_backend_sched_eval_callback (the importance matrix uses one)
    rpc: tuple[str, ...] = ()  # llama.cpp RPC workers (HOST:PORT) that n_gpu_layers go to


def context_shape(options: LoadOptions, n_ctx: int) -> ContextShape:
    """The context these options make: the engine loads it, the planner dry-runs it."""
    kv_type = options.type_k if options.type_k == options.type_v else "f16"
    return ContextShape(n_ctx=n_ctx, n_seq=options.n_seq_max, kv_type=kv_type, n_batch=options.n_batch,
                        n_outputs=options.n_outputs, kv_unified=options.kv_unified, flash_attn=options.flash_attn)


class Engine:
    """A context on a model: sequence 0 for generate(), more sequence slots for the scheduler.

    Give a path to load the model with it (the engine then owns it), or a loaded `Model` to share it
    with other engines (the caller closes it after them).
    """

    def __init__(self, path: str | Path | Model, options: LoadOptions | None = None) -> None:
        self.options = options = options or LoadOptions()
        info = path.info if isinstance(path, Model) else read_info(path)  # validate before handing it to C
        n_ctx_train = info.n_ctx_train or DEFAULT_CTX
        n_ctx = options.n_ctx or min(n_ctx_train, DEFAULT_CTX)
        per_sequence = n_ctx if options.kv_unified else n_ctx // options.n_seq_max  # llama.cpp splits n_ctx
        if per_sequence > n_ctx_train:
            raise EdgeLLMError(f"context {per_sequence} is larger than the model's training context "
                               f"({n_ctx_train}); use --ctx {n_ctx_train} or less")
        for name in (options.type_k, options.type_v):
            if name not in KV_TYPES:
                raise EdgeLLMError(f"unknown KV cache type {name!r}; use one of {', '.join(KV_TYPES)}")
        self.n_threads = options.n_threads or default_threads()
        self._lock = threading.Lock()
        self._owns_model = not isinstance(path, Model)
        self.weights = path if isinstance(path, Model) else Model(info, options.n_gpu_layers, options.use_mmap,
                                                                         options.rpc)
        self.info, self.path = info, info.path
        self.vocab, self.n_vocab = self.weights.vocab, self.weights.n_vocab

        cparams = C.llama_context_default_params()
        context_shape(options, n_ctx).apply(cparams)
        cparams.type_k = GGMLQuantizationType[options.type_k.upper()].value
        cparams.type_v = GGMLQuantizationType[options.type_v.upper()].value
        if options.eval_callback is not None:
            cparams.cb_eval = options.eval_callback
        cparams.n_threads = cparams.n_threads_batch = self.n_threads
        self.ctx = C.llama_init_from_model(self.weights.ptr, cparams)
        if not self.ctx:
            if self._owns_model:
                self.weights.close()
            raise EdgeLLMError(f"could not create a context of {n_ctx} tokens for {self.path.name} "
                               "(out of memory?); try a smaller --ctx or a quantized KV cache")
        self.n_ctx = C.llama_n_ctx(self.ctx)
        self.n_batch = C.llama_n_batch(self.ctx)
        self.n_outputs = max(options.n_outputs, options.n_seq_max) if options.n_outputs else self.n_batch
        self.memory = C.llama_get_memory(self.ctx)
        self.seq = KVSequence(self.ctx, 0)  # sequence 0: what generate() and prefill() work on
        self._batch = TokenBatch(self.n_batch, options.n_seq_max)
        self._one = TokenBatch(1)  # one token of sequence 0 with logits: the plain decode's batch
        self._one.add(0, 0, (0,), True)
        self._one.raw.n_tokens = 1

    @classmethod
    def load(cls, spec: str | None = None, **options) -> Engine:
        from edgellm.models import resolve

        return cls(resolve(spec), LoadOptions(**options))

    # -- tokens and text: the model's ------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return self.weights.tokenize(text, add_special, parse_special)

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        return self.weights.token_bytes(token, special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return self.weights.detokenize(tokens, special)

    def is_eog(self, token: int) -> bool:
        return self.weights.is_eog(token)

    def special_text(self, token: int) -> str:
        return self.weights.special_text(token)

    @property
    def add_bos(self) -> bool:
        return self.weights.add_bos

    @property
    def is_chat_model(self) -> bool:
        return self.weights.is_chat_model

    def turn_stops(self) -> list[str]:
        return self.weights.turn_stops()

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> str:
        return self.weights.render_chat(messages, add_generation_prompt, tools)

    def chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self.weights.chat_tokens(messages, tools)

    def synchronize(self) -> None:
        """Wait for the last decode to finish. On RPC workers llama_decode returns once the graph is sent; reading
        logits waits, so only a timing that reads none needs this (llama-bench calls it the same way)."""
        C.llama_synchronize(self.ctx)

    def logits(self, index: int = -1) -> np.ndarray:
        """Output row `index` of the last decoded batch (-1: the last), as a numpy view."""
        return logits_row(self.ctx, self.n_vocab, index)

    # -- the KV cache -----------------------------------------------------------------------------
    def reset(self) -> None:
        C.llama_memory_clear(self.memory, True)
        self.seq.tokens = []

    @property
    def kv_tokens(self) -> list[int]:
        """What sequence 0 of the KV cache holds, position by position."""
        return self.seq.tokens

    def sequence(self, seq_id: int) -> KVSequence:
        """Another sequence of this context (its tokens are the caller's to keep)."""
        if not 0 <= seq_id < self.options.n_seq_max:
            raise EdgeLLMError(f"sequence {seq_id} outside this context's {self.options.n_seq_max}")
        return KVSequence(self.ctx, seq_id)

    def truncate(self, n: int) -> None:
        """Keep the first n positions of sequence 0; drop the rest (KVSequence.trim: CacheTrimError when
        llama.cpp cannot, after emptying it)."""
        self.seq.trim(n)

    def decode(self, tokens: Sequence[int], all_logits: bool = False) -> None:
        """Append tokens to sequence 0 in batches of n_batch; logits for the last (or every) token."""
        if len(self.kv_tokens) + len(tokens) > self.n_ctx:
            raise EdgeLLMError(f"context full: {len(self.kv_tokens) + len(tokens)} tokens do not fit in "
                               f"{self.n_ctx}; use a larger --ctx or a shorter prompt")
        if all_logits and min(len(tokens), self.n_batch) > self.n_outputs:
            raise EdgeLLMError(f"a batch of {min(len(tokens), self.n_batch)} logits rows, but this context was "
                               f"made for at most {self.n_outputs} (LoadOptions.n_outputs)")
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            last = start + len(chunk) == len(tokens)
            self._batch.fill(chunk, len(self.kv_tokens), logits_last=last, all_logits=all_logits)
            rc = C.llama_decode(self.ctx, self._batch.raw)
            if rc != 0:
                raise EdgeLLMError(f"llama_decode failed with code {rc} "
                                   f"({'KV cache full' if rc == 1 else 'compute error'})")
            self.kv_tokens.extend(chunk)

    def decode_one(self, token: int) -> None:
        """Append one token to sequence 0, logits for it: the plain decode's batch, reused (only the id and
        the position change)."""
        pos = len(self.kv_tokens)
        if pos >= self.n_ctx:
            raise EdgeLLMError(f"context full: {pos + 1} tokens do not fit in {self.n_ctx}")
        b = self._one.raw
        b.token[0], b.pos[0] = token, pos
        rc = C.llama_decode(self.ctx, b)
        if rc != 0:
            raise EdgeLLMError(f"llama_decode failed with code {rc} ({'KV cache full' if rc == 1 else 'compute error'})")
        self.kv_tokens.append(token)

    def rewind(self, n: int) -> None:
        """Keep the first n positions of sequence 0. Where llama.cpp cannot drop a tail (a recurrent state, a
        sliding window past n) the sequence was emptied: those n tokens are decoded again."""
        held = self.kv_tokens[:n]
        try:
            self.truncate(n)
        except CacheTrimError:
            self.decode(held)

    def decode_tree(self, tokens: Sequence[int], positions: Sequence[int],
                    seq_ids: Sequence[Sequence[int]]) -> None:
        """Decode tokens that belong to several sequences at once (a token tree), logits for all.

        Leaves `kv_tokens` alone: the caller decides which branch stays (see speculative.tree).
        """
        if len(tokens) > self.n_outputs:
            raise EdgeLLMError(f"a token tree of {len(tokens)} rows, but this context was made for at most "
                               f"{self.n_outputs} (LoadOptions.n_outputs)")
        batch = self._batch
        batch.clear()
        for token, pos, seqs in zip(tokens, positions, seq_ids, strict=True):
            batch.add(token, pos, seqs, True)
        batch.decode(self.ctx)

    def prefill(self, tokens: Sequence[int]) -> int:
        """Make the KV cache hold `tokens` with logits for the last one; return how many were decoded."""
        if not tokens:
            raise EdgeLLMError("empty prompt")
        if len(tokens) >= self.n_ctx:
            raise EdgeLLMError(f"the prompt is {len(tokens)} tokens but the context holds {self.n_ctx}; "
                               "use a larger --ctx or a shorter prompt")
        common = min(common_prefix(self.kv_tokens, tokens), len(tokens) - 1)  # the last is decoded again for its logits
        with contextlib.suppress(CacheTrimError):  # emptied: the whole prompt is decoded below
            self.truncate(common)
        new = tokens[len(self.kv_tokens):]
        self.decode(new)
        return len(new)

    # -- generation -------------------------------------------------------------------------------
    def generate(self, prompt: Sequence[int], sampling: SamplingParams | None = None,
                 max_tokens: int = 256, stop: Sequence[str] = (),
                 cancel: threading.Event | None = None, ignore_eog: bool = False,
                 speculator: Speculating | None = None) -> Iterator[Record]:
        """Stream the continuation of `prompt` (token ids), one record per sampled token.

        `ignore_eog` keeps going past end-of-generation tokens (benchmarks want a fixed length).
        `speculator` (speculative.setup.make_speculator) drafts tokens for the target to verify.
        """
        with self._lock:
            yield from stream_generate(self, prompt, sampling or SamplingParams(), max_tokens, stop, cancel,
                                       ignore_eog, speculator)

    def chat(self, messages: list[dict[str, str]], stop: Sequence[str] = (), **kwargs) -> Iterator[Record]:
        """Reply to `messages`; the turn also ends where the model writes its end-of-turn markers as text."""
        return self.generate(self.chat_tokens(messages), stop=[*stop, *self.turn_stops()], **kwargs)

    def close(self) -> None:
        for name in ("_batch", "_one"):
            if getattr(self, name, None) is not None:
                getattr(self, name).free()
                setattr(self, name, None)
        if getattr(self, "ctx", None):
            C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "_owns_model", False) and getattr(self, "weights", None) is not None:
            self.weights.close()
            self.weights = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
