"""The quantize pipeline as one library call: convert -> importance matrix -> plan -> quantize -> report.

`edgellm quantize` and the TUI's quantize screen both call `run(job, progress, cancel)`. `progress(stage,
done, total)` names the stage (one of STAGES) and, where known, how far it is. A cancel (a set
threading.Event) is honoured between stages and between tensors of the conversion and the size plan; it
raises `Cancelled` and leaves no file under the output name (the F16 intermediate and any temporary
file are removed, as on any error).
"""

from __future__ import annotations

import re
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.errors import EdgeLLMError

STAGES = ("convert", "importance matrix", "plan", "quantize", "report")
Progress = Callable[[str, int | None, int | None], None]


class Cancelled(EdgeLLMError):
    """The user cancelled; nothing was left under the output name."""


@dataclass(frozen=True)
class QuantizeJob:
    source: Path  # a Hugging Face model folder (a repo id is downloaded first: models.snapshot)
    out: Path
    qtype: str = "Q4_K_M"
    size_bytes: int | None = None  # a size budget: a type per tensor (qtype is then chosen by the plan)
    bpw: float | None = None
    imatrix_file: Path | None = None
    calibration: Path | None = None
    no_imatrix: bool = False
    imatrix_chunks: int = 32
    report: bool = True
    draft: bool = False  # a self-draft: fewer layers, fewer bits
    draft_keep: float = 0.5
    tensor_types: dict[str, str] = field(default_factory=dict)
    output_type: str | None = None
    embedding_type: str | None = None
    threads: int | None = None
    force: bool = False

    @property
    def budget(self) -> tuple[int | None, float | None] | None:
        return (self.size_bytes, self.bpw) if self.size_bytes is not None or self.bpw is not None else None


@dataclass
class QuantizeResult:
    out: Path
    qtype: str
    quality: object | None = None  # report.Quality
    mix: str | None = None  # the size plan's description, with a budget


def parse_budget(text: str) -> tuple[int | None, float | None]:
    """"300MB", "1.2GB" -> (bytes, None); "4.5 bpw", "4.5bpw" -> (None, bits)."""
    from edgellm.quantize.budget import parse_size

    bits = re.fullmatch(r"\s*([0-9.]+)\s*bpw\s*", text, re.IGNORECASE)
    if bits:
        return None, check_bpw(float(bits.group(1)))
    return parse_size(text), None


def check_bpw(bpw: float) -> float:
    if not 1.5 <= bpw <= 16:
        raise EdgeLLMError(f"--bpw {bpw} is out of range; use 1.5 to 16 bits per weight")
    return bpw


def check(job: QuantizeJob) -> None:
    """Everything that can be refused before any work: type, budget, draft, output, disk."""
    from edgellm.quantize.convert import load_config, safetensor_files
    from edgellm.quantize.quantize import check_type, tensor_type

    check_type(job.qtype.upper(), not job.no_imatrix)
    if job.calibration is not None:
        if not job.calibration.is_file():
            raise EdgeLLMError(f"calibration file {job.calibration} not found")
        try:
            job.calibration.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EdgeLLMError(f"calibration file {job.calibration} is not UTF-8 text (byte {e.start})") from None
    for name in (job.output_type, job.embedding_type, *job.tensor_types.values()):
        if name:
            tensor_type(name)
    if job.budget is not None and job.draft:
        raise EdgeLLMError("--size/--bpw and --draft do not go together; a self-draft has its own mix")
    config, _ = load_config(job.source)
    if job.out.exists() and not job.force:
        raise EdgeLLMError(f"{job.out} exists; pass --force to overwrite it")
    job.out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    weights = sum(f.stat().st_size for f in safetensor_files(job.source) if f.exists())
    dtype_bytes = {"float32": 4}.get(config.get("torch_dtype"), 2)
    need = weights * 2 // dtype_bytes + weights // 2  # the F16 intermediate, then the quantized file
    free = shutil.disk_usage(job.out.parent).free
    if free < need:
        raise EdgeLLMError(f"not enough disk in {job.out.parent}: {free / 1e9:.1f} GB free, about "
                           f"{need / 1e9:.1f} GB needed")


def run(job: QuantizeJob, progress: Progress | None = None, cancel: threading.Event | None = None) -> QuantizeResult:
    """Quantize; the result is recorded in the model manifest (integrity.py) with its sha256."""
    check(job)
    for stale in temporaries(job.out):  # left by a run that was killed (kill -9, power loss)
        stale.unlink(missing_ok=True)
    result = _run(job, progress, cancel)
    from edgellm.integrity import record

    record(result.out, f"quantize {job.source.name} {result.qtype}")
    return result


def _run(job: QuantizeJob, progress: Progress | None, cancel: threading.Event | None) -> QuantizeResult:
    from edgellm.quantize.convert import convert
    from edgellm.quantize.quantize import CONVERT_ONLY

    def report(stage: str, done: int | None = None, total: int | None = None) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("quantize cancelled; nothing was written")
        if progress is not None:
            progress(stage, done, total)

    tick = lambda stage: lambda done, total: report(stage, done, total)  # noqa: E731
    qtype = job.qtype.upper()
    if qtype in CONVERT_ONLY and job.budget is None and not job.tensor_types:
        report("convert")
        convert(job.source, job.out, CONVERT_ONLY[qtype], force=job.force, progress=tick("convert"))
        try:
            quality = None
            if job.report:
                report("report")
                # F16 is its own reference; the others are compared with an F16 made for the report
                from edgellm.quantize.report import measure

                quality = (measure(job.out, job.out, threads=job.threads) if qtype == "F16"
                           else report_against_f16(job.source, job.out, job.threads))
        except Cancelled:  # a cancel means nothing written, even once the file is whole
            job.out.unlink(missing_ok=True)
            raise
        return QuantizeResult(job.out, qtype, quality)
    intermediate = job.out.with_name(f".{job.out.stem}.f16.gguf")
    try:
        return _quantize(job, intermediate, report, tick)
    finally:
        intermediate.unlink(missing_ok=True)  # a 7B model's F16 is 14 GB of a laptop's disk


def _quantize(job: QuantizeJob, intermediate: Path, report, tick) -> QuantizeResult:
    from edgellm.gguf_info import read_info
    from edgellm.quantize.convert import convert
    from edgellm.quantize.imatrix import ImportanceMatrix
    from edgellm.quantize.imatrix import compute as compute_imatrix
    from edgellm.quantize.quantize import draft_layers_to_drop, quantize
    from edgellm.quantize.report import measure

    qtype, tensor_types, mix_text = job.qtype.upper(), dict(job.tensor_types), None
    report("convert")
    convert(job.source, intermediate, "f16", force=True, progress=tick("convert"))
    if job.budget is not None:  # an impossible budget fails now, not after the slow steps
        from edgellm.quantize.budget import target_bytes

        target_bytes(read_info(intermediate), *job.budget)
    imatrix = None
    if job.imatrix_file is not None:
        imatrix = ImportanceMatrix.load(job.imatrix_file)
    elif not job.no_imatrix:
        report("importance matrix")
        text = job.calibration.read_text(encoding="utf-8") if job.calibration else None
        imatrix = compute_imatrix(intermediate, text, max_chunks=job.imatrix_chunks, threads=job.threads,
                                  dataset=str(job.calibration) if job.calibration else "assets/calibration.txt")
        imatrix.save(job.out.with_name(f"{job.out.stem}.imatrix"))
    if job.budget is not None:
        from edgellm.quantize.budget import plan

        report("plan")
        mix = plan(intermediate, imatrix, job.budget[0], job.budget[1], job.threads, tick("plan"))
        qtype = mix.file_type()
        tensor_types = tensor_types | mix.overrides()  # the user's patterns first: they win
        mix_text = f"size budget: {mix.file_bytes / 1e6:,.1f} MB planned, {mix.describe()}"
    report("quantize")
    prune = draft_layers_to_drop(read_info(intermediate).n_layer, job.draft_keep) if job.draft else None
    quantize(intermediate, job.out, qtype, job.threads, imatrix, prune, tensor_types, job.output_type,
             job.embedding_type)
    quality = None
    try:
        if job.report and not job.draft:  # a draft is not meant to match its target token for token
            report("report")
            quality = measure(intermediate, job.out, threads=job.threads)
    except Cancelled:  # a cancel means nothing written, even once the file is whole
        job.out.unlink(missing_ok=True)
        raise
    return QuantizeResult(job.out, qtype, quality, mix_text)


def temporaries(out: Path) -> list[Path]:
    """Every file a run for `out` writes under a temporary name before renaming (or deleting) it."""
    f16 = out.with_name(f".{out.stem}.f16.gguf")
    imatrix = out.with_name(f"{out.stem}.imatrix")
    names = [out.with_name(f".{out.name}.partial"), f16, f16.with_name(f".{f16.name}.partial"),
             imatrix.with_name(f".{imatrix.name}.partial")]
    return [p for p in names if p.exists()]


def report_against_f16(src: Path, out: Path, threads: int | None):
    """`out` measured against a fresh F16 of `src`, which is deleted afterwards."""
    from edgellm.quantize.convert import convert
    from edgellm.quantize.report import measure

    reference = out.with_name(f".{out.stem}.f16.gguf")
    try:
        return measure(convert(src, reference, "f16", force=True), out, threads=threads)
    finally:
        reference.unlink(missing_ok=True)
