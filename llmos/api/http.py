"""The HTTP protocol the server runs: uvicorn's, with deadlines on each request's head and body.

uvicorn closes a keep-alive connection that stays idle, but none that has sent part of a request:
300 sockets sending half a header, no credential needed, were all still open 20 s later
(slowloris), and so were 1,500 that declared a body of 500 bytes and sent 14 (the body is read
before the credential is checked). Each request's head (request line and headers) must now be
complete within server.head_timeout_s of its first byte, or of the connection's opening, and its
body within server.body_timeout_s of its head; else the connection is closed. The body's size is
bounded apart (server.max_body_bytes).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def protocol(head_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's ``http`` for its Config: its httptools protocol with these deadlines."""
    deadlines = {"head_timeout_s": head_timeout_s, "body_timeout_s": body_timeout_s}
    return type("RequestDeadlineProtocol", (RequestDeadlineProtocol,), deadlines)


class RequestDeadlineProtocol(HttpToolsProtocol):
    head_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_deadline(self.head_timeout_s)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:  # a later request on a kept-alive connection
            self._start_deadline(self.head_timeout_s)

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        super().on_headers_complete()
        self._start_deadline(self.body_timeout_s)  # ended by on_message_complete (at once without a body)

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _start_deadline(self, seconds: float) -> None:
        self._deadline = self.loop.call_later(seconds, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()
