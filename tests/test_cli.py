"""The CLI in real subprocesses: output, JSON stats, and one clear line for each kind of bad input."""

import json
from pathlib import Path

import pytest


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("edgellm: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_run_json_is_deterministic_with_greedy(cli):
    args = ("run", "smollm2-135m", "Name a color.", "--temp", "0", "-n", "24", "--json")
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    a, b = json.loads(first.stdout), json.loads(second.stdout)
    assert a["text"] == b["text"] and a["text"].strip()
    assert a["stats"]["generated_tokens"] <= 24
    assert a["finish_reason"] in ("eog", "length")
    assert a["stats"]["prompt_tokens"] == a["stats"]["prefilled_tokens"] > 5


def test_run_streams_text_and_reads_stdin(cli):
    result = cli("run", "smollm2-135m", "-", "--temp", "0", "-n", "16", input="Write a long story about the sea.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stderr == "edgellm: token limit (-n 16)\n"  # a reply cut short says why


def test_raw_completion_with_stop(cli):
    result = cli("run", "smollm2-135m", "1, 2, 3, 4,", "--raw", "--temp", "0", "-n", "30",
                 "--stop", "8", "--json")
    out = json.loads(result.stdout)
    assert out["finish_reason"] == "stop"
    assert "8" not in out["text"] and "5" in out["text"]


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "alias", "ctx", "kv"])
def test_bad_input_gives_one_clear_line(cli, tmp_path: Path, smollm2: Path, case: str):
    if case == "missing":
        args, expect = ("run", str(tmp_path / "gone.gguf"), "hi"), ("not found",)
    elif case == "text":
        fake = tmp_path / "notes.gguf"
        fake.write_text("not a model at all\n" * 50)
        args, expect = ("run", str(fake), "hi"), ("not a GGUF file",)
    elif case == "truncated":
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(smollm2.read_bytes()[:3_000_000])
        args, expect = ("run", str(cut), "hi"), ("truncated", "re-download")
    elif case == "alias":
        args, expect = ("run", "no-such-model", "hi"), ("unknown model", "smollm2-135m")
    elif case == "ctx":
        args, expect = ("run", "smollm2-135m", "hi", "--ctx", "100000"), ("training context", "8192")
    else:
        args, expect = ("run", "smollm2-135m", "hi", "--kv-type", "q9"), ()
        result = cli(*args)
        assert result.returncode == 2 and "invalid choice" in result.stderr
        return
    assert_one_line_error(cli(*args), *expect)


def test_models_lists_the_embedded_default(cli):
    result = cli("models", "--json")
    assert result.returncode == 0, result.stderr
    models = json.loads(result.stdout)
    default = next(m for m in models if m["name"] == "smollm2-135m" and m["source"] == "embedded")
    assert default["arch"] == "llama" and default["quant"] == "Q4_1" and default["context"] == 8192


def test_plain_chat_over_a_pipe(cli, no_local_models):
    result = cli("chat", "--temp", "0", "-n", "24", input="Hi!\n/stats\n/reset\nWhat is 1+1?\n", env=no_local_models)
    assert result.returncode == 0, result.stderr
    assert "prefilled_tokens" in result.stdout
    assert "(new conversation)" in result.stdout


def test_bench_reports_pp_and_tg(cli):
    result = cli("bench", "smollm2-135m", "-p", "32", "-g", "8", "-r", "2", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["test"]: r for r in json.loads(result.stdout)["results"]}
    assert set(rows) == {"pp32", "tg8"}
    assert all(r["tps_median"] > 0 and len(r["samples"]) == 2 for r in rows.values())


def test_doctor_runs_a_decode(cli):
    result = cli("doctor", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["test_decode"].startswith("ok: 8 tokens decoded")
    assert "AVX" in report["llama_cpp_system_info"]
    assert "build_problems" not in report


@pytest.mark.parametrize("signal_name", ["SIGILL", "SIGSEGV"])
def test_doctor_reports_a_crashing_build(cli, signal_name: str):
    result = cli("doctor", env={"EDGELLM_SMOKE_SIGNAL": signal_name})
    assert result.returncode == 1
    assert f"crashed with {signal_name}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_weights_read_or_memory_mapped_give_the_same_text(cli):
    args = ("run", "smollm2-135m", "Name three colors.", "--temp", "0", "-n", "24", "--json")
    read, mapped = json.loads(cli(*args).stdout), json.loads(cli(*args, "--mmap").stdout)
    assert read["text"] == mapped["text"] and read["text"].strip()
