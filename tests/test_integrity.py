"""Models that pull and quantize put in place are recorded with their sha256; a changed one is caught;
private directories are created 0700."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from hub_server import Hub

from tests.test_quantize import tiny_checkpoint

REPO, FILE = "test-org/SmolLM2-135M-Instruct-GGUF", "smollm2-135m-instruct-q4_1.gguf"


@pytest.fixture
def env(tmp_path: Path, smollm2: Path):
    with Hub({REPO: {FILE: smollm2}}) as hub:
        yield {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": "0", "EDGELLM_DATA": str(tmp_path / "data"),
               "EDGELLM_MODELS": str(tmp_path / "models")}


def test_a_pulled_model_is_recorded_verified_and_refused_once_changed(cli, env: dict[str, str], smollm2: Path):
    pulled = cli("pull", REPO, "--file", FILE, env=env)
    assert pulled.returncode == 0, pulled.stderr
    path = Path(pulled.stdout.strip().rsplit(" -> ", 1)[1])
    manifest = json.loads((Path(env["EDGELLM_DATA"]) / "manifest.json").read_text())
    (entry,) = manifest.values()
    assert entry["sha256"] == hashlib.sha256(smollm2.read_bytes()).hexdigest()
    assert entry["size"] == smollm2.stat().st_size and entry["source"].startswith(f"pull {REPO}")
    ok = cli("models", "verify", env=env)
    assert ok.returncode == 0 and ok.stdout.startswith("ok ")

    with open(path.resolve(), "r+b") as f:  # a flipped byte: same size, another digest
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = cli("models", "verify", "--json", env=env)
    assert bad.returncode == 1 and json.loads(bad.stdout)[0]["status"] == "changed"
    with open(path.resolve(), "ab") as f:  # a file that grew (a copy over it, a bad write)
        f.write(b"\0" * 4096)
    run = cli("run", str(path), "Hi", "-n", "2", env=env)
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1
    assert "was recorded at" in run.stderr and "edgellm models verify" in run.stderr


def test_a_quantized_model_is_recorded_in_a_private_models_dir(cli, env: dict[str, str], tmp_path: Path,
                                                             smol_hf: Path):
    folder = tiny_checkpoint(tmp_path / "Tiny", "LlamaForCausalLM", smol_hf)
    made = cli("quantize", str(folder), "--type", "Q8_0", "--no-report", env=env)
    assert made.returncode == 0, made.stderr
    out = Path(env["EDGELLM_MODELS"]) / "Tiny-Q8_0.gguf"
    checks = json.loads(cli("models", "verify", "--json", env=env).stdout)
    assert checks == [{"path": str(out.resolve()), "status": "ok", "detail": ""}]
    for private in (Path(env["EDGELLM_MODELS"]), Path(env["EDGELLM_DATA"])):
        assert stat.S_IMODE(private.stat().st_mode) == 0o700, private


@pytest.mark.filterwarnings("ignore:A test tried to use socket")
def test_the_test_suite_has_no_network_but_loopback():
    import socket

    from pytest_socket import SocketConnectBlockedError

    with pytest.raises(SocketConnectBlockedError):
        socket.create_connection(("198.51.100.7", 443), timeout=1)  # TEST-NET-2: never a real host
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:  # loopback stays open
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=1):
            pass
