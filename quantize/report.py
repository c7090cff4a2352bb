"""Quality report: how far a quantized model is from its F16 reference on held-out text.

Like llama-perplexity's KL-divergence mode: the text is cut into chunks of n_ctx tokens; in each
chunk, the second half is scored (so every scored token has context). Reported: perplexity of both
models, mean KL divergence of the quantized model's next-token distribution from the reference's,
how often both pick the same top token, the file size and bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edgellm.gguf_info import read_info
from edgellm.runtime.engine import Engine, LoadOptions

HELDOUT = resources.files("edgellm.assets").joinpath("heldout.txt")  # package data: works from a wheel


@dataclass
class Quality:
    ppl_reference: float
    ppl_quantized: float
    mean_kld: float
    same_top1: float
    size_bytes: int
    bits_per_weight: float
    scored_tokens: int

    def lines(self) -> list[str]:
        return [f"perplexity  F16 {self.ppl_reference:.4f}   quantized {self.ppl_quantized:.4f}",
                f"mean KLD    {self.mean_kld:.5f}   same top-1 {self.same_top1:.1%}   ({self.scored_tokens} tokens)",
                f"size        {self.size_bytes / 1e6:,.1f} MB   {self.bits_per_weight:.2f} bits per weight"]


def log_softmax(logits: np.ndarray, dtype: type = np.float64) -> np.ndarray:
    x = logits.astype(dtype)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _chunk_logprobs(engine: Engine, chunk: list[int], first: int) -> np.ndarray:
    """Log-probabilities after each of chunk[first:-1]: the context in one go, then the scored part in
    batches of n_batch (llama.cpp sizes its output buffers by the batch: 0.6 MB a row on a 150k vocabulary)."""
    engine.reset()
    engine.decode(chunk[:first])
    rows = []
    for start in range(first, len(chunk) - 1, engine.n_batch):
        piece = chunk[start:min(start + engine.n_batch, len(chunk) - 1)]
        engine.decode(piece, all_logits=True)
        rows += [engine.logits(i).copy() for i in range(len(piece))]
    return log_softmax(np.stack(rows))


def measure(reference: Path, quantized: Path, text: str | None = None, n_ctx: int = 512,
            chunks: int = 4, threads: int | None = None) -> Quality:
    text = text if text is not None else HELDOUT.read_text(encoding="utf-8")
    options = LoadOptions(n_ctx=n_ctx, n_threads=threads, n_batch=128)
    with Engine(reference, options) as ref, Engine(quantized, options) as q:
        tokens = ref.tokenize(text, add_special=False)
        pieces = [tokens[i:i + n_ctx] for i in range(0, len(tokens) - n_ctx + 1, n_ctx)][:chunks]
        if not pieces:
            raise ValueError(f"the held-out text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
        nll_ref = nll_q = kld = same = n = 0.0
        for chunk in pieces:
            first = n_ctx // 2
            targets = np.array(chunk[first + 1:])
            lp_ref = _chunk_logprobs(ref, chunk, first)
            lp_q = _chunk_logprobs(q, chunk, first)
            rows = np.arange(len(targets))
            nll_ref -= lp_ref[rows, targets].sum()
            nll_q -= lp_q[rows, targets].sum()
            kld += (np.exp(lp_ref) * (lp_ref - lp_q)).sum()
            same += (lp_ref.argmax(axis=-1) == lp_q.argmax(axis=-1)).sum()
            n += len(targets)
    info = read_info(quantized)
    return Quality(float(np.exp(nll_ref / n)), float(np.exp(nll_q / n)), float(kld / n), float(same / n),
                   info.size_bytes, info.bits_per_weight, int(n))
