"""The FastAPI application: routes, error shapes, the body-size cap, start and stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos import __version__
from llmos.api import dashboard
from llmos.api.deps import Keyring
from llmos.api.limits import RateLimiter, make_limiter
from llmos.api.metrics import instrument
from llmos.api.openai import router as openai_router
from llmos.api.relay import Slots
from llmos.api.routes import router
from llmos.api.schemas import clean_errors
from llmos.daemon import Daemon
from llmos.store.db import is_unavailable

log = logging.getLogger(__name__)


DRAIN_S = 5.0  # how long an oversized body is read (and dropped) before the 413, at most
DRAIN_MAX_BYTES = 64 << 20  # and how much of it


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, counting the bytes actually streamed in
    (Content-Length may be absent or false). Before answering, the rest of the body is read and
    dropped, up to DRAIN_MAX_BYTES more: a client that writes its whole body before it reads
    (Python's urllib) would otherwise meet a connection reset instead of the 413, as the server
    closes a socket with unread data in it (urllib, default cap: bodies of 3 MB and more). Up to
    DRAIN_MAX_BYTES, for DRAIN_S at most; past that (or a declared length past it) the answer
    comes at once and the connection closes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = HTTPException(413, f"request body is larger than {self.max_bytes} bytes (server.max_body_bytes)")
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                if int(value) <= DRAIN_MAX_BYTES:
                    await _drain(receive, int(value))
                await JSONResponse({"detail": too_large.detail}, status_code=413)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body", False):
                        await _drain(receive, DRAIN_MAX_BYTES)
                    raise too_large
            return message

        await self.app(scope, limited, send)


async def _drain(receive: Receive, limit: int) -> None:
    """Read and drop request body messages until the body ends, ``limit`` bytes were read, or
    DRAIN_S passed."""

    async def drop() -> None:
        read = 0
        while read <= limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(drop(), DRAIN_S)


STORE_RETRY_AFTER_S = 5  # the Retry-After of a 503 while the store cannot be reached


class _OncePer:
    """A warning logged at most once per ``interval_s`` (an outage fails every request)."""

    def __init__(self, interval_s: float, message: str) -> None:
        self.interval_s, self.message, self._last = interval_s, message, -math.inf

    def warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            log.warning(self.message, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def create_app(daemon: Daemon, manage_lifecycle: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            daemon.start()
        try:
            yield
        finally:
            if manage_lifecycle:
                daemon.stop()

    app = FastAPI(
        title="llmos",
        version=__version__,
        description="A causal language model that keeps learning from new text and feedback while it serves.",
        lifespan=lifespan,
    )
    app.state.daemon = daemon
    store_down = _OncePer(10.0, "the store cannot be reached: answering 503 (%s)")
    limits = daemon.settings.limits
    app.state.keyring = Keyring(daemon.admin_token, daemon.settings.auth.api_keys)
    shared = limits.storage_url
    app.state.key_limiter = make_limiter(limits.key_rate_per_s, limits.key_burst, limits.max_tracked, shared, "key")
    app.state.source_limiter = make_limiter(
        limits.source_rate_per_s, limits.source_burst, limits.max_tracked, shared, "source"
    )
    # Refused admin attempts are audited, a burst of 60 per client address and then one a second:
    # a flood of bad tokens cannot fill the store with audit rows.
    app.state.refusal_audit = RateLimiter(1.0, 60, limits.max_tracked)
    app.state.generation_slots = Slots(daemon.settings.serving.max_requests)
    app.include_router(router)
    app.include_router(openai_router)  # /v1/completions, /v1/chat/completions, /v1/models
    dashboard.install(app)  # /dashboard

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": clean_errors(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            # FastAPI's words for a body json.loads could not take: bytes that are not UTF-8,
            # or nesting deeper than the parser allows.
            detail = "request body is not parseable JSON: it must be UTF-8 and not nested too deeply"
        headers = exc.headers
        if exc.status_code == 405:
            # Starlette names only the first route on the path; a path served by several (GET and
            # POST /generate) must list every method it allows.
            allowed = {
                m for m in _METHODS for r in _req.app.routes if r.matches({**_req.scope, "method": m})[0] is Match.FULL
            }
            headers = {**(headers or {}), "Allow": ", ".join(sorted(allowed))}
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def _store(_req: Request, exc: DBAPIError | PoolTimeout) -> JSONResponse:
        # A pool with no connection free for the busy timeout: every one waits on the store.
        if isinstance(exc, DBAPIError) and not is_unavailable(exc):
            raise exc  # a bug, not an outage: the 500 below
        # The store is down or locked: nothing was acknowledged; the client retries later.
        store_down.warn(exc)
        headers = {"Retry-After": str(STORE_RETRY_AFTER_S)}
        return JSONResponse({"detail": "the store cannot be reached; retry later"}, status_code=503, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(req: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", req.method, req.url.path)
        return JSONResponse({"detail": "internal error; see the server log"}, status_code=500)

    app.add_middleware(BodyLimit, max_bytes=daemon.settings.server.max_body_bytes)
    instrument(app, daemon)  # /metrics, and request latency by route (outermost middleware)
    return app
