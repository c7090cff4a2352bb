#!/usr/bin/env python3
"""Tool calls and structured output: `edgellm serve` against `llama-server --jinja`, in one run, on the same GGUF.

The set is `agent_prompts.json` (five tools; twelve prompts, each with the function it needs and the arguments
expected, or none). For each server, started in turn on a free loopback port with one slot:
- tool_choice "auto", greedy: the valid-call rate (of the prompts that need a tool, those answered with a call
  whose name is declared and whose arguments parse and validate against its parameters), the right-function
  rate (of all prompts: the function needed, or text where none is), and the right-arguments rate;
- tool_choice "required" (llama-server takes no named function), greedy: the valid-call rate;
- decode tokens/s with and without a grammar: the same prompt asking for JSON, free and under
  response_format json_schema, with the model's default sampling and a fixed seed, `--rounds` each, the
  median of the server's own decode timing (llama-server's timings.predicted_per_second, edgellm's
  x_edgellm.decode_tps).
Prints a table and the ratios. Goals (#20): forced calls 100% valid; right-function >= 2/3 and at least
llama-server's; a grammar costs < 10% of decode speed (with / without >= 0.90).

    python benchmarks/agents.py [--models qwen2.5-coder-0.5b] [--rounds 3] [--only edgellm|llama-server]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import jsonschema
from llama_tools import tool_paths
from present import present_models
from serve import SERVERS, running

SET = json.loads((Path(__file__).resolve().parent / "agent_prompts.json").read_text())
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in SET["tools"]}


def post(base_url: str, body: dict, timeout: float = 600) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=timeout) as r:
        return json.loads(r.read())


def calls_of(reply: dict) -> list[tuple[str, object]]:
    """(name, arguments or None when they do not parse) of each call in a reply."""
    out = []
    for c in reply["choices"][0]["message"].get("tool_calls") or []:
        try:
            args = json.loads(c["function"]["arguments"])
        except (ValueError, TypeError):
            args = None
        out.append((c["function"]["name"], args))
    return out


def valid(call: tuple[str, object]) -> bool:
    name, args = call
    return name in PARAMS and isinstance(args, dict) and jsonschema.Draft202012Validator(PARAMS[name]).is_valid(args)


def arguments_match(args: object, expected: dict) -> bool:
    if not isinstance(args, dict):
        return False
    for k, v in expected.items():
        got = args.get(k)
        if isinstance(v, str) and not (isinstance(got, str) and got.strip().lower() == v.lower()):
            return False
        if isinstance(v, int | float) and not (isinstance(got, int | float) and float(got) == float(v)):
            return False
    return True


def tool_rates(base_url: str, model: str) -> dict[str, float]:
    needing = [p for p in SET["prompts"] if p["call"]]
    valid_auto = right_fn = right_args = valid_forced = 0
    for p in SET["prompts"]:
        body = {"model": model, "messages": [{"role": "user", "content": p["prompt"]}], "tools": SET["tools"],
                "tool_choice": "auto", "temperature": 0, "max_tokens": 160}
        calls = calls_of(post(base_url, body))
        if p["call"] is None:
            right_fn += not calls
            right_args += not calls
            continue
        valid_auto += bool(calls) and all(map(valid, calls))
        if calls and calls[0][0] == p["call"]:
            right_fn += 1
            right_args += valid(calls[0]) and arguments_match(calls[0][1], p["arguments"])
        forced = calls_of(post(base_url, {**body, "tool_choice": "required"}))
        valid_forced += bool(forced) and all(map(valid, forced))
    n, k = len(SET["prompts"]), len(needing)
    return {"valid_auto": valid_auto / k, "right_function": right_fn / n, "right_arguments": right_args / n,
            "valid_forced": valid_forced / k}


def decode_tps(reply: dict) -> float:
    if "timings" in reply:  # llama-server
        return float(reply["timings"]["predicted_per_second"])
    return float(reply["x_edgellm"]["decode_tps"])


def grammar_speeds(base_url: str, model: str, rounds: int) -> tuple[float, float, int]:
    """Median decode tokens/s (free, under the schema) and how many grammar replies validated."""
    body = {"model": model, "messages": [{"role": "user", "content": SET["grammar_prompt"]}], "max_tokens": 400,
            "seed": 42}
    schema = {"type": "json_schema", "json_schema": {"name": "people", "schema": SET["grammar_schema"]}}
    free, constrained, ok = [], [], 0
    post(base_url, {**body, "max_tokens": 8})  # warm-up
    for _ in range(rounds):  # ABAB
        free.append(decode_tps(post(base_url, body)))
        reply = post(base_url, {**body, "response_format": schema})
        constrained.append(decode_tps(reply))
        try:
            jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), SET["grammar_schema"])
            ok += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return statistics.median(free), statistics.median(constrained), ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=SERVERS)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()
    kinds = [a.only] if a.only else list(SERVERS)
    binary = tool_paths("llama-server")[0] if "llama-server" in kinds else None
    for name, path in present_models(a.models):
        results = {}
        for kind in kinds:
            with running(kind, binary, name, path, 1, a.threads, start_timeout=300) as (server, model):
                rates = tool_rates(server.base_url, model)
                free, constrained, ok = grammar_speeds(server.base_url, model, a.rounds)
            results[kind] = {**rates, "free_tps": free, "grammar_tps": constrained, "grammar_valid": ok}
            r = results[kind]
            print(f"{name:20s} {kind:12s} auto: valid {r['valid_auto']:.0%} right-function {r['right_function']:.0%} "
                  f"right-arguments {r['right_arguments']:.0%} | required: valid {r['valid_forced']:.0%} | "
                  f"decode {free:.1f} tok/s free, {constrained:.1f} under the schema "
                  f"({constrained / free:.2f}x; {ok}/{a.rounds} valid)", flush=True)
        if len(results) == 2:
            e, ls = results["edgellm"], results["llama-server"]
            print(f"{name:20s} edgellm / llama-server: right-function {e['right_function']:.0%} vs "
                  f"{ls['right_function']:.0%}, forced valid {e['valid_forced']:.0%} vs {ls['valid_forced']:.0%}, "
                  f"decode under the schema {e['grammar_tps'] / ls['grammar_tps']:.2f}x, "
                  f"free {e['free_tps'] / ls['free_tps']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
