"""Fuzzing: structured mutations of a real GGUF through `edgellm run` (no crash, no traceback, one-line
refusals, NaN or ±inf weights refused for their logits), and the atheris (libFuzzer) harnesses in
tests/fuzz/ for a bounded number of runs from seeds made of real files, with a fixed -seed. Both are
reproducible. benchmarks/fuzz.py runs 1,000 mutations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from edgellm.gguf_info import read_info
from edgellm.quantize.convert import convert
from tests.support.fuzz_cases import fuzz
from tests.test_quantize import tiny_checkpoint

HARNESSES = Path(__file__).resolve().parent / "fuzz"
SEED = 1  # libFuzzer's -seed for every harness run


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, smol_hf: Path) -> Path:
    folder = tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "Tiny", "LlamaForCausalLM", smol_hf)
    return convert(folder, folder.parent / "tiny.gguf", "q8_0")


def test_structured_mutations_of_a_real_gguf_never_crash_the_app(tiny_gguf: Path, tmp_path: Path):
    """Through `edgellm run`'s default decoding path; files with NaN or ±inf weights (every 11th mutation) must
    end non-zero with one `edgellm:` line about non-finite logits."""
    outcome = fuzz(tiny_gguf, 100, tmp_path, seed=1)
    assert outcome.findings == [], outcome.summary() + "\n" + "\n".join(outcome.findings)
    assert outcome.refused + outcome.ran == 100 and outcome.refused >= 60
    assert outcome.damaged == 9, outcome.summary()  # output_norm and token_embd with NaN, inf and -inf, and more


def small_gguf(path: Path) -> bytes:
    """A whole, small GGUF (a llama with a 16-token vocabulary): the reader's seed."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(16)])
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    read_info(path)
    return path.read_bytes()


def small_checkpoint() -> bytes:
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16,
              "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "tie_word_embeddings": True}
    w = lambda *shape: np.zeros(shape, np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(16, 8), "model.norm.weight": w(8)}
    p = "model.layers.0."
    tensors |= {p + "input_layernorm.weight": w(8), p + "post_attention_layernorm.weight": w(8),
                p + "self_attn.q_proj.weight": w(8, 8), p + "self_attn.k_proj.weight": w(4, 8),
                p + "self_attn.v_proj.weight": w(4, 8), p + "self_attn.o_proj.weight": w(8, 8),
                p + "mlp.gate_proj.weight": w(16, 8), p + "mlp.up_proj.weight": w(16, 8),
                p + "mlp.down_proj.weight": w(8, 16)}
    blob = json.dumps(config).encode()
    return len(blob).to_bytes(4, "little") + blob + save_safetensors(tensors)


@pytest.mark.parametrize("harness", ["fuzz_gguf", "fuzz_template", "fuzz_checkpoint"])
def test_fuzz_harness_runs_clean_from_real_seeds(harness: str, tmp_path: Path, smollm2: Path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if harness == "fuzz_gguf":
        (corpus / "small").write_bytes(small_gguf(tmp_path / "small.gguf"))
    elif harness == "fuzz_template":
        for i, template in enumerate((read_info(smollm2).chat_template, "{{ messages[0]['content'] | upper }}")):
            (corpus / f"t{i}").write_bytes(template.encode() + b"\0What is the capital of France?")
    else:
        (corpus / "small").write_bytes(small_checkpoint())
    # a fixed seed (and hash seed): the same inputs on every run, so a finding fails every run, not one in N
    done = subprocess.run([sys.executable, str(HARNESSES / f"{harness}.py"), f"-seed={SEED}", "-runs=4000",
                           "-max_total_time=40", "-rss_limit_mb=4096", str(corpus)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Seed: {SEED}" in done.stderr and "Done" in done.stderr and not list(tmp_path.glob("crash-*"))
