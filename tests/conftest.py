"""Shared fixtures: the embedded SmolLM2 model, one engine for the session, and a CLI runner."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgellm.models import resolve
from edgellm.runtime.engine import Engine, LoadOptions

# Variables of the caller's shell that would change what the tests see; the tests that need one set it.
CLEARED_PREFIXES = ("HF_", "HUGGINGFACE_", "TEXTUAL_")  # the hub client (offline, cache, endpoint, token...), the TUI
CLEARED = ("HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "DISABLE_TELEMETRY", "DO_NOT_TRACK",  # huggingface-hub
           "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy",  # hub_reachable
           "NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_COMPATIBLE", "TTY_INTERACTIVE",  # rich's output
           "EDGELLM_VERBOSE", "EDGELLM_SMOKE_SIGNAL",  # llama.cpp's log on stderr; a fault injected on purpose
           "EDGELLM_RPC", "EDGELLM_RPC_STALL_S")  # workers a user named for their own runs, and their patience
KEPT = ("TEXTUAL_SNAPSHOT_TEMPDIR",)  # pytest-textual-snapshot's own, set at the session's start for its report


@pytest.fixture(scope="session", autouse=True)
def hermetic_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same environment for every test (and the CLIs they start) whatever the caller's shell holds:
    `HF_HUB_OFFLINE=1` there made the pull tests fail. EDGELLM_DEV_MODELS (where the dev models are) and
    EDGELLM_CACHE (the build cache) are kept."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if (name.startswith(CLEARED_PREFIXES) or name in CLEARED) and name not in KEPT:
                mp.delenv(name)
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))  # an empty hub cache: no model the user pulled
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no test reaches the real hub
        mp.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        mp.setenv("HF_HUB_DISABLE_XET", "1")  # the local test hub serves plain files
        mp.setenv("EDGELLM_MODELS", str(tmp_path_factory.mktemp("models")))  # none of the user's (nor their drafts)
        mp.setenv("EDGELLM_DATA", str(tmp_path_factory.mktemp("data")))  # chat history, the manifest: never the user's
        for module in ("huggingface_hub.constants", "textual.constants"):
            reread(mp, module)
        yield


def reread(mp: pytest.MonkeyPatch, module_name: str) -> None:
    """A module that read the environment when first imported (maybe before the fixture ran) gets the values
    a fresh import would read now."""
    module = importlib.import_module(module_name)
    spec = importlib.util.find_spec(module_name)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    for name, value in vars(fresh).items():
        if name.isupper():
            mp.setattr(module, name, value)


@pytest.fixture(scope="session", autouse=True)
def data_dir(hermetic_env: None) -> Path:
    """The chat history of every test (and the CLIs they start) lives here, never in the user's data dir."""
    return Path(os.environ["EDGELLM_DATA"])


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
