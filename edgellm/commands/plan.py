"""`edgellm plan MODEL`: what a load would take, where each buffer goes, and the settings that fit."""

from __future__ import annotations

import argparse
import json

from edgellm.memory.plan import PlanRequest, make_plan, parse_size
from edgellm.models import default_model, resolve
from edgellm.options import add_rpc_arguments, choose_draft, ram_budget, rpc_endpoints
from edgellm.runtime.probe import KV_TYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="GGUF path, alias or repo id (default: the chat's)")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context per slot (default: the model's, "
                   "at most 4096, shorter if that does not fit)")
    p.add_argument("--draft", default="auto", metavar="MODEL|auto|off",
                   help="plan a draft model beside it (auto: a local model with the same vocabulary)")
    p.add_argument("--parallel", type=int, default=1, help="sequence slots decoded together")
    p.add_argument("--kv-type", choices=KV_TYPES, default=None, help="KV cache type (default: f16, "
                   "q8_0 then q4_0 when it does not fit)")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=None, help="layers on the GPU (default: what fits)")
    add_rpc_arguments(p)  # --rpc and --ram
    p.add_argument("--vram", default=None, help="GPU memory to plan for, e.g. 6G (default: the GPU's free memory)")
    p.add_argument("--estimate", action="store_true", help="from the GGUF header only (no llama.cpp dry run)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def main(a: argparse.Namespace) -> int:
    from edgellm.gguf_info import read_info

    info = read_info(resolve(a.model) if a.model else default_model().path)
    choice = choose_draft(info, a.draft, a.ctx, None, a.gpu_layers)
    req = PlanRequest(n_ctx=a.ctx, parallel=a.parallel, kv_type=a.kv_type, draft=choice.path,
                      speculative=a.draft != "off", n_gpu_layers=a.gpu_layers,
                      ram=ram_budget(a), vram=parse_size(a.vram) if a.vram else None,
                      dry_run=not a.estimate, rpc=rpc_endpoints(a))
    plan = make_plan(info, req)
    plan.draft_reason = choice.reason
    print(json.dumps(plan.as_dict()) if a.json else plan.describe())
    return 0
