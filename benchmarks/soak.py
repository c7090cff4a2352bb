#!/usr/bin/env python3
"""Soak: 500 chat turns on SmolLM2 in one process, as the chat runs them (ChatSession with the default
speculation, each message committed to the SQLite history, a new conversation every 10 turns, the
KV cache of the last one parked to disk and restored). Prints RSS, open file descriptors and threads
after a warm-up and at the end. Goal: RSS growth < 5% after warm-up, no fd or thread growth.
(The server's 200 requests join this when `edgellm serve` exists.)

    python benchmarks/soak.py [--turns 500] [--warmup 50] [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from edgellm.models import resolve
from edgellm.runtime import kvfile
from edgellm.runtime.engine import Engine, LoadOptions
from edgellm.runtime.sampling import SamplingParams
from edgellm.session import ChatSession
from edgellm.speculative.setup import make_speculator
from edgellm.tui.history import History, Message

QUESTIONS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
             "How many legs does a spider have?", "Give me a word that rhymes with cat.",
             "What is 12 times 7?", "Say hello in Spanish.", "Name a planet.", "What is water made of?",
             "Tell me a short fact about the moon."]


def figures() -> tuple[int, int, int]:
    return (psutil.Process().memory_info().rss, len(os.listdir("/proc/self/fd")),
            len(os.listdir("/proc/self/task")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--model", default="smollm2-135m")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Engine(resolve(a.model), LoadOptions(n_ctx=2048, n_outputs=33)) as engine:
        history = History(Path(tmp) / "history.sqlite")
        session = ChatSession(engine, SamplingParams(temperature=0.7, seed=1), max_tokens=48,
                              speculator=make_speculator(engine, "edit"))
        conversation, parked = history.create(engine.info.name), Path(tmp) / "parked.kv"
        t0, base = time.perf_counter(), None
        for turn in range(a.turns):
            if turn and turn % 10 == 0:  # a new conversation; the old one's cache parked and brought back
                kvfile.save(engine, 0, list(engine.kv_tokens), parked)
                engine.reset()
                engine.seq.tokens = kvfile.load(engine, 0, parked, engine.n_ctx)
                session.reset()
                engine.reset()
                conversation = history.create(engine.info.name)
            question = QUESTIONS[turn % len(QUESTIONS)]
            history.add(conversation, Message("user", question))
            *_, last = session.send(question)
            history.add(conversation, Message("assistant", session.messages[-1]["content"], "complete",
                                              last.stats.as_dict()))
            if turn + 1 == a.warmup:
                base = figures()
                print(f"after {a.warmup} turns (warm-up): RSS {base[0] / 2**20:.1f} MiB, {base[1]} fds, "
                      f"{base[2]} threads", flush=True)
        end = figures()
        history.close()
        session.speculator.close()
    assert base is not None
    growth = end[0] / base[0] - 1
    print(f"after {a.turns} turns ({time.perf_counter() - t0:.0f} s): RSS {end[0] / 2**20:.1f} MiB ({growth:+.1%} "
          f"since warm-up; goal < 5%), fds {end[1]} ({end[1] - base[1]:+d}), threads {end[2]} ({end[2] - base[2]:+d}); "
          f"Python threads {threading.active_count()}")
    return 0 if growth < 0.05 and end[1] <= base[1] and end[2] <= base[2] else 1


if __name__ == "__main__":
    sys.exit(main())
