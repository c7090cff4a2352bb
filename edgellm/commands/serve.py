"""`edgellm serve`: OpenAI- and Ollama-compatible APIs on loopback, for editors, agents and scripts."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys

from edgellm.errors import EdgeLLMError
from edgellm.options import add_rpc_arguments, ram_budget, rpc_endpoints
from edgellm.server.catalog import Catalog
from edgellm.server.driver import Driver, Settings

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model", action="append", default=[], metavar="M",
                   help="load this model at start (repeatable); any listed model loads on its first request")
    p.add_argument("--parallel", type=int, default=None,
                   help="requests decoded together per model (default: 4 where memory allows)")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context per request (default: the model's, at most 4096)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=None, help="layers on the GPU (default: what fits)")
    p.add_argument("--keep-alive", default="5m", help="how long an idle model stays loaded (default: 5m)")
    p.add_argument("--draft", default="auto", metavar="auto|edit|off",
                   help="per-request speculation: lookup drafts where they pay (auto), or off")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key")
    p.add_argument("--cors", action="append", default=[], metavar="ORIGIN", help="allow browser requests from ORIGIN")
    add_rpc_arguments(p)  # --rpc, --ram


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(a: argparse.Namespace) -> int:
    import uvicorn

    from edgellm.server.app import create_app
    from edgellm.server.ollama_api import keep_alive_seconds

    if not 0 < a.port < 65536:
        raise EdgeLLMError(f"--port must be between 1 and 65535 (got {a.port})")
    if a.parallel is not None and not 1 <= a.parallel <= 64:
        raise EdgeLLMError("--parallel must be between 1 and 64")
    if a.ctx is not None and a.ctx < 16:
        raise EdgeLLMError("--ctx must be at least 16")
    if not is_loopback(a.host):
        if not a.api_key and not a.insecure:
            raise EdgeLLMError(f"--host {a.host} opens the server to the network: add --api-key KEY (or --insecure "
                               "to serve without one)")
        print(f"edgellm: warning: serving on {a.host}, reachable from other machines"
              + ("" if a.api_key else " with no API key"), file=sys.stderr)
    try:
        keep_alive = keep_alive_seconds(a.keep_alive)
    except EdgeLLMError as e:
        raise EdgeLLMError(f"--keep-alive: {e}") from e
    ram_budget(a)  # a bad --ram, and each worker (reachable, a worker, free), refused before the port opens
    workers = rpc_endpoints(a)
    if workers:
        from edgellm.runtime.rpc import free_memory, parse_endpoints

        free_memory(parse_endpoints(",".join(workers)))
    catalog = Catalog()
    preload = [catalog.find(name) for name in a.model]  # an unknown model is refused before the port opens
    settings = Settings(parallel=a.parallel, ctx=a.ctx, threads=a.threads, gpu_layers=a.gpu_layers,
                        draft=a.draft, keep_alive_s=keep_alive if keep_alive is not None else 300.0,
                        rpc=",".join(workers), ram=a.ram)
    driver = Driver(settings)

    failures: list[str] = []

    async def load_first() -> None:
        for entry in preload:
            try:
                await warm(driver, entry)
            except EdgeLLMError as e:  # said in one line once uvicorn has stopped
                failures.append(f"--model {entry.name}: {e}")
                server.stop_soon()
                return

    def announce() -> None:  # once the port is open
        names = ", ".join(e.name for e in catalog.entries())
        print(f"edgellm: serving on http://{a.host}:{a.port} (OpenAI /v1, Ollama /api); models: {names}", flush=True)
        for m in driver.loaded():
            print(f"edgellm: loaded {m['name']}: {m['slots']} slot(s) x {m['n_ctx']} tokens", flush=True)

    app = create_app(driver, catalog, a.api_key, a.cors, on_ready=load_first)
    # uvicorn's own log stays quiet: its errors come back here as one line each (never a traceback)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="critical", access_log=False,
                            timeout_graceful_shutdown=10)
    server = Server(config, driver, announce)
    try:
        server.run()
    except OSError as e:  # the port is taken, the address is not ours
        raise EdgeLLMError(f"cannot serve on {a.host}:{a.port}: {e.strerror or e}") from e
    except SystemExit:  # uvicorn exits when it cannot bind: said below in one line
        if server.started:
            raise
    if failures:
        raise EdgeLLMError(failures[0])
    if not server.started:  # uvicorn logged why (a port in use) and returned
        raise EdgeLLMError(f"could not serve on {a.host}:{a.port} (is the port in use?)")
    return 0


async def warm(driver: Driver, entry) -> None:
    from edgellm.server import jobs
    from edgellm.server.driver import Job

    job = Job(entry, None, " ", {}, 1, [], asyncio.get_running_loop())
    await jobs.start(driver, job)
    await jobs.collect(driver, job)


class Server:
    """uvicorn's server; Ctrl-C and SIGTERM first cancel every stream (each ends with a last chunk), then
    uvicorn closes the connections and the lifespan unloads the models."""

    def __init__(self, config, driver: Driver, announce) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            async def startup(self, sockets=None) -> None:
                await super().startup(sockets)
                if self.started:
                    announce()

            def handle_exit(self, sig, frame) -> None:
                # uvicorn's own re-raises the signal once it has shut down (exit status -15); a clean stop
                # is a clean exit, 0
                driver.stop_soon()
                if self.should_exit and sig == signal.SIGINT:
                    self.force_exit = True
                self.should_exit = True

        self._server = _Server(config)

    def run(self) -> None:
        self._server.run()

    @property
    def started(self) -> bool:
        return bool(self._server.started)

    def stop_soon(self) -> None:
        self._server.should_exit = True
