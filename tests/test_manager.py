"""The model manager with real models under a small budget: sharing, eviction, queueing, refusal, keep-alive."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.memory.manager import ModelManager
from edgellm.memory.plan import PlanRequest, make_plan
from edgellm.runtime.engine import Engine
from tests.dev_models import dev_model
from tests.support.threads import WatchedEngines

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
    assert manager.wait_for(lambda: any(ev.startswith("waiting: " + gemma3.name) for ev in manager.events), 120)
    assert not got
    manager.release(held)
    t.join(120)
    assert got == ["gemma3"] and manager.loaded() == [gemma3]
    held = manager.acquire(gemma3, REQUEST, n_threads=2)
    with pytest.raises(EdgeLLMError, match="did not finish in time"):
        manager.acquire(smollm2, REQUEST, timeout=0.2, n_threads=2)
    manager.wait_s = 0.2  # no timeout given: the manager's, never for ever
    with pytest.raises(EdgeLLMError, match=r"did not finish in time \(0.2 s\)"):
        manager.acquire(smollm2, REQUEST, n_threads=2)
    manager.release(held)
    manager.close()


def test_a_model_that_can_never_fit_is_refused_before_loading(smollm2):
    loads = CountingLoads()
    manager = ModelManager(budget=20 << 20, load=loads)
    # in MiB or GiB: the budget is beside the process's base, which is larger late in a test run
    with pytest.raises(EdgeLLMError, match=r"does not fit: it needs [\d.]+ [MG]iB"):
        manager.acquire(smollm2, REQUEST)
    assert loads.paths == [] and manager.loaded() == []


def test_idle_models_are_unloaded_on_the_llama_thread_when_the_keep_alive_runs_out(smollm2):
    loads = WatchedEngines()
    manager = ModelManager(budget=4 * charge(smollm2), keep_alive_s=0.0, load=loads)
    with manager.use(smollm2, REQUEST, n_threads=2):
        manager.expire()
        assert manager.loaded() == [smollm2]  # in use: kept
    # nothing calls the manager again: its timer unloads the idle model, on the llama thread
    assert loads.closed.wait(60)
    assert manager.loaded() == [] and loads.closed_on == ["llama_0"]
    assert any(ev.startswith("unloaded after keep-alive " + smollm2.name) for ev in manager.events)


def test_the_keep_alive_timer_keeps_no_process_alive_and_close_stops_it(smollm2):
    manager = ModelManager(budget=4 * charge(smollm2), keep_alive_s=3600.0)
    before = set(threading.enumerate())
    with manager.use(smollm2, REQUEST, n_threads=2):
        pass
    (timer,) = [t for t in threading.enumerate() if t.name == "edgellm-keep-alive" and t not in before]
    assert timer.daemon and manager.loaded() == [smollm2]  # idle, waiting out its hour
    manager.close()
    timer.join(10)
    assert not timer.is_alive() and manager.loaded() == []
    assert not [t for t in threading.enumerate() if t.name == "edgellm-keep-alive" and t not in before]
