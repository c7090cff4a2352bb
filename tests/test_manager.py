"""The model manager with real models under a small budget: sharing, eviction, queueing, refusal."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.memory.manager import ModelManager
from edgellm.memory.plan import PlanRequest, make_plan
from edgellm.runtime.engine import Engine
from tests.dev_models import dev_model

REQUEST = PlanRequest(n_ctx=512)


def charge(path: Path) -> int:
    plan = make_plan(path, REQUEST)
    return plan.peak_bytes - plan.base_bytes


class CountingLoads:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, path, options) -> Engine:
        self.paths.append(Path(path).name)
        return Engine(path, options)


@pytest.fixture(scope="module")
def gemma3() -> Path:
    return dev_model("gemma3-270m")


def test_users_of_one_model_share_one_load(smollm2):
    loads = CountingLoads()
    manager = ModelManager(budget=4 * charge(smollm2), load=loads)
    with manager.use(smollm2, REQUEST, n_threads=2) as a, manager.use(smollm2, REQUEST, n_threads=2) as b:
        assert a is b
    assert loads.paths == [smollm2.name]
    manager.close()


def test_the_least_recently_used_idle_model_is_evicted(smollm2, gemma3):
    loads = CountingLoads()
    manager = ModelManager(budget=charge(smollm2) + charge(gemma3) - 1, load=loads)
    with manager.use(smollm2, REQUEST, n_threads=2):
        pass
    with manager.use(gemma3, REQUEST, n_threads=2) as e:
        assert e.info.arch == "gemma3"
    assert manager.loaded() == [gemma3] and manager.used <= manager.budget
    assert any(ev.startswith("evicted " + smollm2.name) for ev in manager.events)
    manager.close()


def test_a_load_that_does_not_fit_yet_waits_for_a_release(smollm2, gemma3):
    manager = ModelManager(budget=max(charge(smollm2), charge(gemma3)) + (1 << 20))
    held = manager.acquire(smollm2, REQUEST, n_threads=2)
    got: list[str] = []

    def other() -> None:
        with manager.use(gemma3, REQUEST, n_threads=2) as e:
            got.append(e.info.arch)

    t = threading.Thread(target=other)
    t.start()
    time.sleep(1.0)
    assert not got and any(ev.startswith("waiting: " + gemma3.name) for ev in manager.events)
    manager.release(held)
    t.join(60)
    assert got == ["gemma3"] and manager.loaded() == [gemma3]
    held = manager.acquire(gemma3, REQUEST, n_threads=2)
    with pytest.raises(EdgeLLMError, match="did not finish in time"):
        manager.acquire(smollm2, REQUEST, timeout=0.2, n_threads=2)
    manager.release(held)
    manager.close()


def test_a_model_that_can_never_fit_is_refused_before_loading(smollm2):
    loads = CountingLoads()
    manager = ModelManager(budget=20 << 20, load=loads)
    with pytest.raises(EdgeLLMError, match=r"does not fit: it needs \d+ MiB"):
        manager.acquire(smollm2, REQUEST)
    assert loads.paths == [] and manager.loaded() == []


def test_idle_models_are_unloaded_after_the_keep_alive(smollm2):
    manager = ModelManager(budget=4 * charge(smollm2), keep_alive_s=0.0)
    with manager.use(smollm2, REQUEST, n_threads=2):
        manager.expire()
        assert manager.loaded() == [smollm2]  # in use: kept
    time.sleep(0.01)
    manager.expire()
    assert manager.loaded() == []
