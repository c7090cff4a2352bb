"""`edgellm quantize MODEL --type Q4_K_M`: Hugging Face folder -> GGUF -> low-bit GGUF, one command.

The F16 intermediate lives next to the output under a hidden name and is deleted as soon as it has
been quantized; the result lands in the models dir (so `edgellm models` lists it) unless -o says
otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.models import models_dir, snapshot


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json) "
                   "or hub repo id (owner/name)")
    p.add_argument("--revision", default=None, help="hub branch, tag or commit (with a repo id)")
    p.add_argument("--type", default="Q4_K_M", help="F16, BF16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, "
                   "Q2_K, … (default: Q4_K_M)")
    p.add_argument("-o", "--output", default=None, help="output GGUF (default: the models dir)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--no-report", action="store_true", help="skip the quality report after quantizing")
    p.add_argument("--calibration", default=None, help="text for the importance matrix (default: assets/)")
    p.add_argument("--imatrix", default=None, help="use this importance matrix file instead of computing one")
    p.add_argument("--imatrix-chunks", type=int, default=32, help="512-token chunks of calibration text")
    p.add_argument("--no-imatrix", action="store_true", help="quantize without an importance matrix")
    p.add_argument("--size", default=None, help="size budget for the file (300MB, 1.2GB): a type per tensor "
                   "from measured sensitivity, lowest KL divergence that fits (--type is then ignored)")
    p.add_argument("--bpw", type=float, default=None, help="size budget in bits per weight (4.5)")
    p.add_argument("--output-type", default=None, help="type for output.weight (Q6_K, Q8_0, F16…)")
    p.add_argument("--embedding-type", default=None, help="type for token_embd.weight")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="type for the tensors whose name matches REGEX (repeatable; first match wins)")
    p.add_argument("--draft", action="store_true",
                   help="make a self-draft for speculative decoding: fewer layers (see --draft-keep), fewer bits")
    p.add_argument("--draft-keep", type=float, default=0.5, help="share of the layers a self-draft keeps")
    p.add_argument("--report", action="store_true",
                   help="only report: compare the existing output (-o) with a fresh F16 of MODEL")


def main(a: argparse.Namespace) -> int:
    from rich.progress import Progress

    from edgellm.quantize.convert import load_config
    from edgellm.quantize.pipeline import QuantizeJob, report_against_f16, run

    src = Path(a.model).expanduser()
    if not src.is_dir():
        src = snapshot(a.model, a.revision, HUB_PATTERNS)
    qtype = a.type.upper()
    budget = budget_bytes(a)
    load_config(src)
    suffix = f"draft-{qtype}" if a.draft else f"{a.size or f'{a.bpw}bpw'}" if budget is not None else qtype
    out = Path(a.output).expanduser() if a.output else models_dir() / f"{src.name}-{suffix}.gguf"
    if a.report:
        if not out.exists():
            raise EdgeLLMError(f"{out} does not exist; quantize first, or pass the file with -o")
        print_report(out, report_against_f16(src, out, a.threads))
        return 0
    job = QuantizeJob(src, out, qtype, *(budget or (None, None)),
                      imatrix_file=Path(a.imatrix).expanduser() if a.imatrix else None,
                      calibration=Path(a.calibration).expanduser() if a.calibration else None,
                      no_imatrix=a.no_imatrix, imatrix_chunks=a.imatrix_chunks, report=not a.no_report,
                      draft=a.draft, draft_keep=a.draft_keep, tensor_types=parse_tensor_types(a.tensor_type),
                      output_type=a.output_type, embedding_type=a.embedding_type, threads=a.threads, force=a.force)
    with Progress(transient=True) as bar:
        task = bar.add_task("converting", total=None)
        words = {"convert": "converting", "importance matrix": "importance matrix", "plan": "measuring sensitivity",
                 "quantize": "quantizing", "report": "measuring quality"}
        result = run(job, lambda stage, done, total: bar.update(task, description=words[stage], completed=done or 0,
                                                                 total=total))
    if result.mix:
        print(result.mix)
    print(f"{out} ({out.stat().st_size / 1e6:,.0f} MB, {result.qtype})")
    if result.quality is not None:
        print_report(out, result.quality)
    return 0


# what a conversion needs from a hub repo; pickled weights (*.bin, *.pt, *.pth) are never fetched
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"]


def budget_bytes(a: argparse.Namespace) -> tuple[int | None, float | None] | None:
    """(bytes, None) for --size, (None, bits) for --bpw, None without a budget."""
    from edgellm.quantize.budget import parse_size

    if a.size and a.bpw:
        raise EdgeLLMError("give --size or --bpw, not both")
    if a.size:
        return parse_size(a.size), None
    if a.bpw is not None:
        from edgellm.quantize.pipeline import check_bpw

        return None, check_bpw(a.bpw)
    return None


def parse_tensor_types(items: list[str]) -> dict[str, str]:
    """['attn_v=Q6_K', ...] -> {'attn_v': 'Q6_K'}, every regex and type checked."""
    import re

    from edgellm.quantize.quantize import tensor_type

    out = {}
    for item in items:
        pattern, sep, name = item.rpartition("=")
        if not sep or not pattern:
            raise EdgeLLMError(f"--tensor-type {item!r}: write it as REGEX=TYPE, e.g. attn_v=Q6_K")
        try:
            re.compile(pattern)
        except re.error as e:
            raise EdgeLLMError(f"--tensor-type {item!r}: bad regex ({e})") from None
        tensor_type(name)
        out[pattern] = name.upper()
    return out


def print_report(quantized: Path, quality) -> None:
    print(f"{quantized} against F16")
    print("\n".join(quality.lines()))
