"""A real `edgellm serve` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

START_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`edgellm serve ARGS --port P` in a subprocess; `start` returns once it says it is serving."""

    command, ready = "serve", "edgellm: serving on"

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.args = [*args, "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.output: list[str] = []
        self._seen = threading.Condition()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        self.proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", self.command, *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                     stdin=subprocess.DEVNULL)
        threading.Thread(target=self._read, daemon=True).start()  # drained always: a full pipe would block it
        self.wait_for(self.ready, START_TIMEOUT_S)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._seen:
                self.output.append(line)
                self._seen.notify_all()
        with self._seen:
            self._closed = True
            self._seen.notify_all()

    def wait_for(self, text: str, timeout: float) -> str:
        """Wait until a line of the server's output holds `text` (the event), or fail after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while True:
                hit = next((line for line in self.output if text in line), None)
                if hit is not None:
                    return hit
                if self._closed:
                    raise AssertionError("the server exited:\n" + "".join(self.output))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {text!r} from the server in {timeout:.0f} s:\n" + "".join(self.output))
                self._seen.wait(left)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with self._seen:
            self._seen.wait_for(lambda: self._closed, timeout)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProcess(ServerProcess):
    """`edgellm worker ARGS --port P`: llama.cpp's RPC server on a free loopback port."""

    command, ready = "worker", "edgellm: worker on"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


def swap_leftovers(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("edgellm-serve-*"))
