"""`edgellm pull` with the real huggingface-hub client against a local hub server (HF_ENDPOINT)."""

import json
from pathlib import Path

import pytest
from hub_server import Hub

REPO = "test-org/SmolLM2-135M-Instruct-GGUF"
FILE = "smollm2-135m-instruct-q4_1.gguf"


@pytest.fixture
def hub(smollm2: Path, tmp_path: Path):
    notes = tmp_path / "README.md"
    notes.write_text("# a model card\n")
    with Hub({REPO: {FILE: smollm2, "README.md": notes}}) as server:
        yield server


@pytest.fixture
def hf_env(tmp_path: Path, hub: Hub) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}


def test_pull_then_run_from_cache_offline(cli, hub: Hub, hf_env: dict[str, str], smollm2: Path):
    pulled = cli("pull", REPO, "--file", FILE, env=hf_env)
    assert pulled.returncode == 0, pulled.stderr
    path = Path(pulled.stdout.strip().rsplit(" -> ", 1)[1])
    assert path.read_bytes() == smollm2.read_bytes()
    assert any(r.startswith("GET ") and FILE in r for r in hub.requests)

    offline = {**hf_env, "HF_HUB_OFFLINE": "1"}
    listed = json.loads(cli("models", "--json", env=offline).stdout)
    assert any(m["name"] == f"{REPO}:{FILE}" and m["source"] == "hf-cache" for m in listed)
    again = cli("pull", REPO, "--file", FILE, env=offline)
    assert again.returncode == 0 and str(path) in again.stdout
    run = cli("run", REPO, "Hi", "--temp", "0", "-n", "4", "--json", env=offline)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["model"] == str(path)


def test_pull_picks_the_gguf_when_no_file_is_given(cli, hub: Hub, hf_env: dict[str, str]):
    pulled = cli("pull", REPO, env=hf_env)
    assert pulled.returncode == 0, pulled.stderr
    assert FILE in pulled.stdout
    assert any("/api/models/" in r and "/tree/" in r for r in hub.requests)


@pytest.mark.parametrize(("args", "expected"), [
    ((REPO, "--file", "missing.gguf"), "not found in"),
    (("nobody/nothing",), "not found on the hub"),
    ((REPO, "--file", FILE, "--revision", "v9"), "revision 'v9' not found"),
])
def test_pull_errors_are_one_line(cli, hf_env: dict[str, str], args, expected: str):
    result = cli("pull", *args, env=hf_env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and expected in result.stderr


def test_offline_and_not_cached_says_so(cli, hf_env: dict[str, str]):
    result = cli("pull", REPO, "--file", FILE, env={**hf_env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "offline" in result.stderr and "not cached" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_on_a_repo_that_is_not_cached_says_pull(cli, hf_env: dict[str, str]):
    result = cli("run", "someone/other-GGUF", "hi", env={**hf_env, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0 and "edgellm pull someone/other-GGUF" in result.stderr


def test_pull_downloads_the_listing_and_the_file_at_one_resolved_commit(cli, hub: Hub, hf_env: dict[str, str]):
    from hub_server import COMMIT

    pulled = cli("pull", REPO, env=hf_env)
    assert pulled.returncode == 0, pulled.stderr
    assert f"/snapshots/{COMMIT}/" in pulled.stdout
    gets = [r for r in hub.requests if "/tree/" in r or "/resolve/" in r]
    assert gets and all(COMMIT in r for r in gets), gets  # no request asked for "main" after resolving it
