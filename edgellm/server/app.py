"""The ASGI app: both APIs on one driver, errors in each API's own JSON shape, and the safety rails
(a body cap, an optional API key compared in constant time, CORS only when asked)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgellm.errors import EdgeLLMError
from edgellm.server import ollama_api, openai_api
from edgellm.server.catalog import Catalog, UnknownModel
from edgellm.server.driver import Driver, ServeError
from edgellm.server.limits import MAX_BODY_BYTES

log = logging.getLogger("edgellm.serve")


def error_response(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    message = " ".join(message.split())  # one line
    if request.url.path.startswith("/api/"):
        body: dict = {"error": message}  # Ollama's shape
    else:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 503: "server_error"}.get(status, "server_error")
        body = {"error": {"message": message, "type": kind, "param": None,
                          "code": "model_not_found" if status == 404 else status}}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """Refuse a body larger than MAX_BODY_BYTES (413), whether it says its length or streams in chunks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            await self._refuse(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise ServeError(f"the request body is over {MAX_BODY_BYTES >> 20} MiB", 413)
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(Request(scope, receive), 413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
        await response(scope, receive, send)


HELPER_THREADS = 4  # the handlers' blocking work (the catalog's file reads): asyncio.to_thread


def started_pool(n: int) -> ThreadPoolExecutor:
    """A pool with all its threads running: the server's thread count is the same under any load (asyncio's
    default pool starts threads as calls overlap, so a later burst would add one)."""
    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="edgellm-helper")
    barrier = threading.Barrier(n)
    for f in [pool.submit(barrier.wait, 30) for _ in range(n)]:
        f.result()
    return pool


def create_app(driver: Driver, catalog: Catalog, api_key: str | None = None, cors: list[str] | None = None,
               on_ready: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        asyncio.get_running_loop().set_default_executor(started_pool(HELPER_THREADS))
        driver.start()
        try:
            if on_ready is not None:
                await on_ready()
            yield
        finally:
            driver.stop()

    app = FastAPI(title="edgellm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError) -> JSONResponse:
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        return error_response(request, e.status, str(e), headers)

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, e: UnknownModel) -> JSONResponse:
        return error_response(request, 404, str(e))

    @app.exception_handler(EdgeLLMError)
    async def edgellm_error(request: Request, e: EdgeLLMError) -> JSONResponse:
        return error_response(request, 400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        """FastAPI's own refusals (a body it cannot parse, as JSON nested past Python's limit; an unknown path)
        in the API's error shape too."""
        return error_response(request, e.status_code, str(e.detail), e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        problems = []
        for err in e.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", "invalid"))
        return error_response(request, 400, "invalid request: " + "; ".join(problems))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request, 500, f"internal error: {type(e).__name__}")

    if api_key:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def check_key(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return error_response(request, 401, "a valid API key is required: Authorization: Bearer KEY")
            return await call_next(request)

    if cors:
        app.add_middleware(CORSMiddleware, allow_origins=cors, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(BodyLimit)

    @app.get("/")
    async def root() -> dict:
        return {"status": "edgellm is running"}

    @app.get("/health")
    async def health() -> dict:
        """Liveness, and each loaded model's slots and requests in them."""
        return {"status": "ok", "models": [{"name": m["name"], "slots": m["slots"], "busy": m["busy"], "n_ctx": m["n_ctx"]}
                                           for m in driver.loaded()]}

    app.include_router(openai_api.router(driver, catalog))
    app.include_router(ollama_api.router(driver, catalog))
    return app
