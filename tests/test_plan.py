"""The memory planner: llama.cpp's dry run against a real load, and the choices under --ram/--vram."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.gguf_info import read_info
from edgellm.memory.plan import PlanRequest, estimate, layer_weights, make_plan
from edgellm.runtime import backend
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.probe import ContextShape, dry_run, parse
from tests.dev_models import dev_model

MIB = 1 << 20


@pytest.fixture(scope="module")
def qwen05() -> Path:
    return dev_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def gemma3() -> Path:
    return dev_model("gemma3-270m")


def model_path(name: str, smollm2: Path, qwen05: Path, gemma3: Path) -> Path:
    return {"smollm2": smollm2, "qwen05": qwen05, "gemma3": gemma3}[name]


@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen05"])
def test_dry_run_equals_the_real_load(name, smollm2, qwen05, gemma3):
    path = model_path(name, smollm2, qwen05, gemma3)
    options = LoadOptions(n_ctx=2048, n_seq_max=2, n_outputs=4, n_threads=2)
    predicted = dry_run(read_info(path), ContextShape(n_ctx=2048, n_seq=2, n_outputs=4))
    with backend.capture() as lines, Engine(path, options):
        pass
    log = "".join(lines)
    real = parse(log, predicted.weights_bytes, 0.0)
    assert real.kv == predicted.kv and predicted.kv_bytes > 0
    assert real.compute_bytes == predicted.compute_bytes > 0
    assert real.output_bytes == predicted.output_bytes > 0
    model_buffers = sum(float(m) * MIB for m in re.findall(r"model buffer size = +([\d.]+) MiB", log))
    assert model_buffers == pytest.approx(predicted.weights_bytes, rel=0.01)
    if name == "gemma3":  # sliding-window layers are a cache of their own
        assert [c.windowed for c in predicted.kv] == [False, True]


# measured (CPU dry runs): SmolLM2 +1.0%, Qwen2.5 0.5B +1.4%, Gemma 3 270M -14.6%
@pytest.mark.parametrize(("name", "rel"), [("smollm2", 0.02), ("gemma3", 0.16), ("qwen05", 0.02)])
def test_header_estimate_is_close_to_the_dry_run(name, rel, smollm2, qwen05, gemma3):
    info = read_info(model_path(name, smollm2, qwen05, gemma3))
    shape = ContextShape(n_ctx=4096, n_outputs=1)
    guess, truth = estimate(info, shape), dry_run(info, shape)
    assert guess.weights_bytes == truth.weights_bytes
    assert guess.kv_bytes == truth.kv_bytes
    assert guess.compute_bytes == pytest.approx(truth.compute_bytes, rel=rel)


def test_the_plan_offloads_the_top_layers_that_fit(qwen05):
    info = read_info(qwen05)
    cpu = make_plan(info, PlanRequest(vram=0))
    assert cpu.target.n_gpu_layers == 0 and cpu.vram_bytes == 0
    everything = make_plan(info, PlanRequest(vram=64 << 30))
    assert everything.target.n_gpu_layers == info.n_layer + 1  # the output head too
    per_layer, embd, _ = layer_weights(info)
    assert everything.target.probe.weights_bytes - everything.target.weights_vram == embd  # input embeddings stay
    budget = 300 * MIB
    part = make_plan(info, PlanRequest(vram=budget))
    n = part.target.n_gpu_layers
    assert 0 < n < info.n_layer and part.vram_bytes <= budget
    kv_layer = part.target.probe.kv_bytes / info.n_layer
    assert part.vram_bytes + per_layer[info.n_layer - 1 - n] + kv_layer > budget  # one more would not fit
    assert part.peak_bytes < cpu.peak_bytes - part.target.weights_vram + MIB
    assert part.load_options().n_gpu_layers == n


def test_a_draft_goes_on_the_gpu_first(qwen05, smollm2):
    # SmolLM2 does not share Qwen's vocabulary, but the planner only sizes it; the draft takes the GPU first
    plan = make_plan(qwen05, PlanRequest(draft=str(smollm2), vram=200 * MIB))
    assert plan.draft is not None and plan.draft.n_gpu_layers == read_info(smollm2).n_layer + 1
    assert plan.target.n_gpu_layers < make_plan(qwen05, PlanRequest(vram=200 * MIB)).target.n_gpu_layers


def test_what_does_not_fit_is_given_up_in_order(qwen05, smollm2):
    info = read_info(qwen05)
    full = make_plan(info, PlanRequest(draft=str(smollm2)))
    without = make_plan(info, PlanRequest())
    dropped = make_plan(info, PlanRequest(draft=str(smollm2), ram=full.peak_bytes - 1))
    assert dropped.draft is None and "draft" in dropped.notes[0]
    quantized = make_plan(info, PlanRequest(ram=without.peak_bytes - 1))
    assert quantized.kv_type == "q8_0" and quantized.n_ctx == without.n_ctx
    assert quantized.target.probe.kv_bytes < without.target.probe.kv_bytes
    fixed_type = make_plan(info, PlanRequest(kv_type="f16", ram=without.peak_bytes - 1))
    assert fixed_type.kv_type == "f16" and fixed_type.n_ctx < without.n_ctx  # the context gives way instead
    four = make_plan(info, PlanRequest(parallel=4, kv_type="f16", n_ctx=4096))
    two = make_plan(info, PlanRequest(parallel=4, kv_type="f16", n_ctx=4096, ram=four.peak_bytes - 1))
    assert two.parallel == 2 and any("slot" in n for n in two.notes)


def test_an_impossible_request_is_refused_with_the_numbers(qwen05, cli):
    with pytest.raises(EdgeLLMError, match=r"does not fit: it needs [\d.]+ [MG]iB .* and 300 MiB is available"):
        make_plan(qwen05, PlanRequest(ram=300 * MIB))
    result = cli("plan", str(qwen05), "--ram", "300M")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit" in lines[0] and "MiB" in lines[0]
    bad = cli("plan", str(qwen05), "--ram", "lots")
    assert bad.returncode == 1 and "cannot read 'lots' as a size" in bad.stderr


def test_plan_json_has_every_figure(qwen05, cli):
    result = cli("plan", str(qwen05), "--ctx", "2048", "--vram", "250M", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in ("peak_bytes", "vram_bytes", "weights_bytes", "kv_bytes", "compute_bytes", "n_gpu_layers",
                "n_ctx", "kv_type", "draft"):
        assert key in plan
    assert plan["n_ctx"] == 2048 and plan["kv_type"] == "f16" and plan["draft"] is None
    assert plan["n_gpu_layers"] > 0 and 0 < plan["vram_bytes"] <= 250 * MIB
    assert plan["kv_bytes"] == 2048 * 24 * 2 * 64 * 2 * 2  # cells x layers x kv heads x head dim x K,V x f16
    text = cli("plan", str(qwen05), "--ctx", "2048", "--vram", "250M")
    assert "layers on the GPU" in text.stdout and "peak host memory" in text.stdout


def test_run_loads_what_the_plan_says(cli):
    speculative = cli("run", "smollm2-135m", "Say hi.", "-n", "4", "--json", "--temp", "0")
    assert speculative.returncode == 0, speculative.stderr
    plan = json.loads(speculative.stdout)["plan"]  # --draft auto: a verification batch's rows
    assert plan["n_outputs"] == 33 and plan["kv_type"] == "f16" and plan["fits"]
    plain = cli("run", "smollm2-135m", "Say hi.", "-n", "4", "--json", "--temp", "0", "--draft", "off")
    assert json.loads(plain.stdout)["plan"]["n_outputs"] == 1


def test_a_batch_wider_than_the_context_was_made_for_is_refused(smollm2):
    with Engine(smollm2, LoadOptions(n_ctx=256, n_outputs=1, n_threads=2)) as e:
        with pytest.raises(EdgeLLMError, match="at most 1"):
            e.decode(e.tokenize("one two three"), all_logits=True)
        e.reset()
        e.decode(e.tokenize("one two three"))  # last-row logits only: fine
        assert e.logits().shape == (e.n_vocab,)


def test_models_lists_what_a_chat_on_each_needs_from_the_header(cli, smollm2):
    listed = json.loads(cli("models", "--json").stdout)
    smol = next(m for m in listed if m["name"] == "smollm2-135m" and m.get("needs_bytes"))
    plan = make_plan(smollm2, PlanRequest(speculative=True))
    assert smol["needs_bytes"] == pytest.approx(plan.peak_bytes - plan.base_bytes, rel=0.07)  # measured: +5.5%
