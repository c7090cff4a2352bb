"""`edgellm worker`: offer this machine's CPU (or GPU) to another edgellm over llama.cpp's RPC backend.

The server is llama.cpp's own (`ggml_backend_rpc_start_server`, what `rpc-server` runs); it serves one
client at a time. Its protocol has no authentication and no encryption, so it binds loopback unless told
`--allow-remote`; reach it from another machine through an SSH tunnel (README "More than one machine").
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

from edgellm.commands.serve import is_loopback
from edgellm.errors import EdgeLLMError
from edgellm.runtime.rpc import DEFAULT_PORT, Endpoint

MIB = 1 << 20


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="llama.cpp's tensor cache, so a model's weights cross the network once "
                        "(default: the edgellm cache's rpc/; 'off' to turn it off)")
    p.add_argument("--mem", default=None, metavar="SIZE",
                   help="memory to offer on each device, e.g. 4G (default: what is free); clients plan with it")
    p.add_argument("--allow-remote", action="store_true",
                   help="bind a non-loopback --host (the protocol has no authentication or encryption)")


def cache_dir(arg: str | None) -> str | None:
    if arg == "off":
        return None
    if arg is None:
        from edgellm.buildflags import cache_dir as root
        path = root() / "rpc"
    else:
        path = Path(arg).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgeLLMError(f"--cache: cannot use {path}: {e.strerror or e}") from e
    return str(path)


def answering(endpoint: Endpoint, server: threading.Thread, timeout: float = 30.0) -> None:
    """Wait until llama.cpp's server answers the protocol's handshake on `endpoint` (its thread binds the port
    some time after it starts)."""
    from edgellm.runtime.rpc import RpcError, check

    local = Endpoint("127.0.0.1" if endpoint.host in ("0.0.0.0", "") else
                     "::1" if endpoint.host == "::" else endpoint.host, endpoint.port)
    deadline = time.monotonic() + timeout
    while True:
        try:
            check(local, timeout=5.0)
            return
        except RpcError:
            if not server.is_alive() or time.monotonic() > deadline:
                raise EdgeLLMError(f"llama.cpp's RPC server did not start on {endpoint}") from None
            time.sleep(0.05)  # the thread is still binding: poll the port again


def main(a: argparse.Namespace) -> int:
    from edgellm.runtime import rpc
    from edgellm.runtime.engine import default_threads

    if not 0 < a.port < 65536:
        raise EdgeLLMError(f"--port must be between 1 and 65535 (got {a.port})")
    if a.threads is not None and not 1 <= a.threads <= 1024:
        raise EdgeLLMError("--threads must be between 1 and 1024")
    if not is_loopback(a.host):
        if not a.allow_remote:
            raise EdgeLLMError(f"--host {a.host} offers this machine to the network with no authentication: add "
                               "--allow-remote, or keep loopback and use an SSH tunnel (README)")
        print(f"edgellm: warning: worker on {a.host}: anyone who can reach this port can run code on its "
              "devices and read what it computes; use it only on a trusted network", file=sys.stderr)
    endpoint = Endpoint(a.host, a.port)
    cache = cache_dir(a.cache)
    threads = a.threads or default_threads()
    devices = rpc.local_devices()
    if not devices:
        raise EdgeLLMError("no device to offer")
    if a.mem is not None:
        from edgellm.memory.plan import parse_size

        limit = parse_size(a.mem)
        if limit < MIB:
            raise EdgeLLMError(f"--mem must be at least 1M (got {a.mem})")
        for device, *_ in devices:
            rpc.cap_memory(device, limit)
        devices = rpc.local_devices()  # as its clients will see them
    try:  # llama.cpp's server exits the process if it cannot bind: find out here first, in one line
        import socket
        with socket.create_server((a.host, a.port)):
            pass
    except OSError as e:
        raise EdgeLLMError(f"cannot listen on {endpoint}: {e.strerror or e}") from e

    # llama.cpp's server loop never returns and holds no Python lock: it runs on a thread of its own, and
    # the main thread waits for Ctrl-C or SIGTERM, then ends the process (nothing of the server to flush)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = threading.Thread(target=rpc.serve, args=(endpoint, cache, threads, [d[0] for d in devices]),
                              name="rpc-server", daemon=True)
    sys.stdout.flush()
    console = os.fdopen(os.dup(1), "w", buffering=1)  # ours; fd 1 goes to /dev/null for llama.cpp's server,
    with open(os.devnull, "w") as quiet:                # whose banner and per-connection lines stay quiet
        os.dup2(quiet.fileno(), 1)
    server.start()
    answering(endpoint, server)  # say where it is only once it answers there
    for _, name, free, total in devices:
        print(f"edgellm: worker device {name}: {free // MIB} MiB free of {total // MIB} MiB", file=console)
    print(f"edgellm: worker on {endpoint} ({threads} threads, tensor cache {cache or 'off'}); "
          f"use it with --rpc {endpoint}", file=console)
    while not stop.wait(0.5):
        if not server.is_alive():
            raise EdgeLLMError(f"llama.cpp's RPC server on {endpoint} stopped")
    print("edgellm: worker stopped", file=console)
    os._exit(0)  # the server thread is inside llama.cpp's accept(): nothing to join
