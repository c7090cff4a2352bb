"""`edgellm quantize MODEL --type Q4_K_M`: Hugging Face folder -> GGUF -> low-bit GGUF, one command.

The F16 intermediate lives next to the output under a hidden name and is deleted as soon as it has
been quantized; the result lands in the models dir (so `edgellm models` lists it) unless -o says
otherwise.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ..errors import EdgeLLMError
from ..models import models_dir, snapshot


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

    from ..quantize.convert import convert, load_config, safetensor_files
    from ..quantize.imatrix import ImportanceMatrix
    from ..quantize.imatrix import compute as compute_imatrix
    from ..quantize.quantize import CONVERT_ONLY, check_type, quantize, tensor_type
    from ..quantize.report import measure

    src = Path(a.model).expanduser()
    if not src.is_dir():
        src = snapshot(a.model, a.revision, HUB_PATTERNS)
    qtype = a.type.upper()
    check_type(qtype, not a.no_imatrix)  # an unknown type, or one that needs an imatrix, fails before any work
    tensor_types = parse_tensor_types(a.tensor_type)
    for name in (a.output_type, a.embedding_type):
        if name:
            tensor_type(name)
    budget = budget_bytes(a)
    if budget is not None and a.draft:
        raise EdgeLLMError("--size/--bpw and --draft do not go together; a self-draft has its own mix")
    config, _ = load_config(src)
    suffix = f"draft-{qtype}" if a.draft else f"{a.size or f'{a.bpw}bpw'}" if budget is not None else qtype
    out = Path(a.output).expanduser() if a.output else models_dir() / f"{src.name}-{suffix}.gguf"
    if a.report:
        if not out.exists():
            raise EdgeLLMError(f"{out} does not exist; quantize first, or pass the file with -o")
        print_report(out, report_against_f16(src, out, a.threads))
        return 0
    if out.exists() and not a.force:
        raise EdgeLLMError(f"{out} exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    weights = sum(f.stat().st_size for f in safetensor_files(src) if f.exists())
    dtype_bytes = {"float32": 4}.get(config.get("torch_dtype"), 2)
    need = weights * 2 // dtype_bytes + weights // 2  # the F16 intermediate, then the quantized file
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise EdgeLLMError(f"not enough disk in {out.parent}: {free / 1e9:.1f} GB free, about "
                           f"{need / 1e9:.1f} GB needed")

    quality = None
    with Progress(transient=True) as bar:
        task = bar.add_task("converting", total=None)
        progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        if qtype in CONVERT_ONLY and budget is None and not tensor_types:
            convert(src, out, CONVERT_ONLY[qtype], force=a.force, progress=progress)
            if not a.no_report:
                bar.update(task, description="measuring quality", total=None)
                # F16 is its own reference; the others are compared with an F16 made for the report
                quality = (measure(out, out, threads=a.threads) if qtype == "F16"
                           else report_against_f16(src, out, a.threads))
        else:
            intermediate = out.with_name(f".{out.stem}.f16.gguf")
            try:
                convert(src, intermediate, "f16", force=True, progress=progress)
                if budget is not None:  # an impossible budget fails now, not after the slow steps
                    from ..gguf_info import read_info
                    from ..quantize.budget import target_bytes

                    target_bytes(read_info(intermediate), *budget)
                imatrix = None
                if a.imatrix:
                    imatrix = ImportanceMatrix.load(Path(a.imatrix).expanduser())
                elif not a.no_imatrix:
                    bar.update(task, description="importance matrix", total=None)
                    text = Path(a.calibration).read_text(encoding="utf-8") if a.calibration else None
                    imatrix = compute_imatrix(intermediate, text, max_chunks=a.imatrix_chunks, threads=a.threads,
                                              dataset=a.calibration or "assets/calibration.txt")
                    imatrix.save(out.with_name(f"{out.stem}.imatrix"))
                if budget is not None:
                    from ..quantize.budget import plan

                    bar.update(task, description="measuring sensitivity", total=None)
                    mix = plan(intermediate, imatrix, budget[0], budget[1], a.threads, progress)
                    qtype = mix.file_type()
                    tensor_types = tensor_types | mix.overrides()  # the user's patterns first: they win
                    print(f"size budget: {mix.file_bytes / 1e6:,.1f} MB planned, {mix.describe()}")
                bar.update(task, description=f"quantizing to {qtype}", total=None)
                prune = None
                if a.draft:
                    from ..gguf_info import read_info
                    from ..quantize.quantize import draft_layers_to_drop

                    prune = draft_layers_to_drop(read_info(intermediate).n_layer, a.draft_keep)
                quantize(intermediate, out, qtype, a.threads, imatrix, prune, tensor_types,
                         a.output_type, a.embedding_type)
                if not a.no_report and not a.draft:  # a draft is not meant to match its target token for token
                    bar.update(task, description="measuring quality", total=None)
                    quality = measure(intermediate, out, threads=a.threads)
            finally:
                intermediate.unlink(missing_ok=True)  # a 7B model's F16 is 14 GB of a laptop's disk
    print(f"{out} ({out.stat().st_size / 1e6:,.0f} MB, {qtype})")
    if quality is not None:
        print_report(out, quality)
    return 0


# what a conversion needs from a hub repo; pickled weights (*.bin, *.pt, *.pth) are never fetched
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json"]


def budget_bytes(a: argparse.Namespace) -> tuple[int | None, float | None] | None:
    """(bytes, None) for --size, (None, bits) for --bpw, None without a budget."""
    from ..quantize.budget import parse_size

    if a.size and a.bpw:
        raise EdgeLLMError("give --size or --bpw, not both")
    if a.size:
        return parse_size(a.size), None
    if a.bpw is not None:
        if not 1.5 <= a.bpw <= 16:
            raise EdgeLLMError(f"--bpw {a.bpw} is out of range; use 1.5 to 16 bits per weight")
        return None, a.bpw
    return None


def parse_tensor_types(items: list[str]) -> dict[str, str]:
    """['attn_v=Q6_K', ...] -> {'attn_v': 'Q6_K'}, every regex and type checked."""
    import re

    from ..quantize.quantize import tensor_type

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


def report_against_f16(src: Path, out: Path, threads: int | None):
    """`out` measured against a fresh F16 of `src`, which is deleted afterwards."""
    from ..quantize.convert import convert
    from ..quantize.report import measure

    reference = out.with_name(f".{out.stem}.f16.gguf")
    try:
        return measure(convert(src, reference, "f16", force=True), out, threads=threads)
    finally:
        reference.unlink(missing_ok=True)


def print_report(quantized: Path, quality) -> None:
    print(f"{quantized} against F16")
    print("\n".join(quality.lines()))
