"""`edgellm models`: the models on this machine, with size, the memory a chat on each needs (the planner's
header estimate: no llama.cpp), architecture, quantization and context."""

from __future__ import annotations

import argparse
import json

from edgellm.gguf_info import ModelInfo
from edgellm.memory.plan import DEFAULT_CTX, SPECULATIVE_OUTPUTS, estimate, fixed_overhead
from edgellm.models import list_local
from edgellm.runtime.probe import ContextShape


def needs_bytes(info: ModelInfo) -> int:
    """Memory a chat on this model needs at the default context, from the GGUF header alone."""
    shape = ContextShape(n_ctx=min(info.n_ctx_train or DEFAULT_CTX, DEFAULT_CTX), n_outputs=SPECULATIVE_OUTPUTS)
    p = estimate(info, shape)
    return fixed_overhead(info) + p.weights_bytes + p.kv_bytes + p.compute_bytes + p.output_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=["verify"],
                   help="verify: check every model pull or quantize recorded against its sha256")
    p.add_argument("--json", action="store_true", help="print as JSON")


def verify(as_json: bool) -> int:
    from edgellm.integrity import manifest_path
    from edgellm.integrity import verify as check_all

    checks = check_all()
    if as_json:
        print(json.dumps([{"path": str(c.path), "status": c.status, "detail": c.detail} for c in checks], indent=2))
    elif not checks:
        print(f"no recorded models ({manifest_path()}); `edgellm pull` and `edgellm quantize` record theirs")
    for c in checks if not as_json else ():
        print(f"{c.status:<8} {c.path}" + (f"  ({c.detail})" if c.detail else ""))
    return 0 if all(c.status == "ok" for c in checks) else 1


def main(a: argparse.Namespace) -> int:
    if a.action == "verify":
        return verify(a.json)
    found = list_local()
    if a.json:
        print(json.dumps([
            {"name": m.name, "kind": m.kind, "source": m.source, "path": str(m.path), "error": m.error}
            | ({"size_bytes": m.info.size_bytes, "arch": m.info.arch, "quant": m.info.file_type,
                "context": m.info.n_ctx_train, "params": m.info.n_params,
                "needs_bytes": needs_bytes(m.info)} if m.info else {})
            for m in found], indent=2))
        return 0
    if not found:
        print("no local models; try: edgellm pull OWNER/REPO")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "KIND", "SIZE", "NEEDS", "ARCH", "QUANT", "CONTEXT", "SOURCE", "PATH"):
        table.add_column(column, no_wrap=column != "PATH", overflow="fold")
    for m in found:
        if m.info is None:
            table.add_row(m.name, "-", "-", "-", "-", "-", "-", m.source, f"unreadable: {m.error}")
            continue
        table.add_row(m.name, m.kind, f"{m.info.size_bytes / 1e6:,.0f} MB", f"{needs_bytes(m.info) / 1e6:,.0f} MB",
                      m.info.arch, m.info.file_type,
                      f"{m.info.n_ctx_train:,}", m.source, str(m.path))
    Console(width=200 if not Console().is_terminal else None).print(table)
    return 0
