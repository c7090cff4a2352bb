"""Shared fixtures: the embedded SmolLM2 model, one engine for the session, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.models import resolve
from edgellm.runtime.engine import Engine, LoadOptions


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chat history of every test (and the CLIs they start) lives here, never in the user's data dir."""
    path = tmp_path_factory.mktemp("data")
    os.environ["EDGELLM_DATA"] = str(path)
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def smol_hf(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """The embedded model exported to a Hugging Face folder (safetensors, config, tokenizer)."""
    from edgellm.quantize.export import export

    return export(smollm2, tmp_path_factory.mktemp("smol-hf") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def engine(smollm2: Path):
    with Engine(smollm2, LoadOptions(n_ctx=2048, n_threads=2)) as e:
        yield e


@pytest.fixture
def fresh_engine(engine: Engine) -> Engine:
    engine.reset()
    return engine


def run_cli(*args: str, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed CLI in a real subprocess, as a user would run it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True,
                          env=full_env, input=input if input is not None else "", timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def no_local_models(tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI run that sees only the embedded model (no models dir, dev models or HF cache)."""
    dirs = {name: tmp_path / name for name in ("models", "dev-models", "hf-home")}
    for d in dirs.values():
        d.mkdir()
    return {"EDGELLM_MODELS": str(dirs["models"]), "EDGELLM_DEV_MODELS": str(dirs["dev-models"]),
            "HF_HOME": str(dirs["hf-home"]), "HF_HUB_OFFLINE": "1"}
