"""A real terminal for end-to-end tests: tmux (send-keys, capture-pane) where it is installed, else a
pseudo-terminal read through pyte's VT100 screen (a machine with only Python, a compiler and cmake)."""

from __future__ import annotations

import os
import pty
import select
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence

KEYS = {"Enter": "\r", "C-q": "\x11", "C-c": "\x03", "Escape": "\x1b"}


class Terminal:
    """One program on a 100x30 terminal."""

    def __init__(self, argv: Sequence[str], env: dict[str, str], name: str, width: int = 100, height: int = 30,
                 backend: str | None = None) -> None:
        self.backend = backend or os.environ.get("EDGELLM_TEST_TERMINAL") or ("tmux" if shutil.which("tmux")
                                                                             else "pty")
        self.name, self.width, self.height = name, width, height
        full_env = {**os.environ, **env, "TERM": "xterm-256color"}
        if self.backend == "tmux":
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**env, "TERM": "xterm-256color"}.items())
            command = f"env {exports} {' '.join(shlex.quote(a) for a in argv)}"
            subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", str(width), "-y", str(height), command],
                           check=True)
            return
        import pyte

        self.screen = pyte.Screen(width, height)
        self.stream = pyte.ByteStream(self.screen)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the program on the terminal's slave side
            import fcntl
            import struct
            import termios

            fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))
            os.execvpe(argv[0], list(argv), full_env)

    def process_id(self) -> int:
        """The program's pid (under tmux: the pane's; `env` execs the program in its place)."""
        if self.backend == "tmux":
            out = subprocess.run(["tmux", "list-panes", "-t", self.name, "-F", "#{pane_pid}"], capture_output=True,
                                 text=True, check=True)
            return int(out.stdout.split()[0])
        return self.pid

    def type(self, text: str) -> None:
        if self.backend == "tmux":
            subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)
        else:
            os.write(self.fd, text.encode())

    def key(self, name: str) -> None:
        if self.backend == "tmux":
            subprocess.run(["tmux", "send-keys", "-t", self.name, name], check=True)
        else:
            os.write(self.fd, KEYS[name].encode())

    def text(self) -> str:
        """What the terminal shows now ("" once the program has ended)."""
        if self.backend == "tmux":
            out = subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name], capture_output=True, text=True)
            return out.stdout if out.returncode == 0 else ""
        while select.select([self.fd], [], [], 0.05)[0]:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the program ended
                return ""
            if not data:
                return ""
            self.stream.feed(data)
        return "\n".join(self.screen.display)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 90.0) -> str:
        deadline = time.monotonic() + timeout
        shown = ""
        while time.monotonic() < deadline:
            shown = self.text()
            if predicate(shown):
                return shown
            time.sleep(0.2)
        raise AssertionError(f"timed out; the terminal ({self.backend}) shows:\n{shown}")

    def close(self) -> None:
        if self.backend == "tmux":
            subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.fd)
