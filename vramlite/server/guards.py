"""Limits on what a client may send and how slowly: header and body size, header and body read time.

A slow-loris client (headers a byte at a time) or a stalled upload would otherwise hold a connection, and a
task, for ever. Sizes and the body's time are checked in ASGI middleware, answered with the contract's error
body; the headers' time is checked in the HTTP protocol, since no ASGI code runs before they are complete.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from vramlite.server.errors import ApiError


class RequestLimitsMiddleware:
    """431 for headers over `max_header_bytes`; 413 for a body over `max_body_bytes` (by Content-Length, or as
    its chunks arrive); 408 for a body not received within `body_timeout` seconds of the request's start."""

    def __init__(self, app: ASGIApp, max_header_bytes: int, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:
            await ApiError(431, "headers_too_large", f"the request headers are {header_bytes} bytes, over the "
                           f"server's limit of {self.max_header_bytes}").response(scope)(scope, receive, send)
            return
        too_large = f"the request body is over the server's limit of {self.max_body_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await ApiError(413, "request_too_large", too_large).response(scope)(scope, receive, send)
            return
        deadline = time.monotonic() + self.body_timeout
        received = 0
        body_done = False

        async def receive_limited() -> Message:
            nonlocal received, body_done
            if body_done:  # after the body, receive() only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
            except asyncio.TimeoutError:
                # Raised inside the route's body read: FastAPI lets HTTPException through to our handler.
                raise HTTPException(408, f"the request body did not arrive within body_timeout="
                                         f"{self.body_timeout:g} s") from None
            received += len(message.get("body", b""))
            body_done = not message.get("more_body", False)
            if received > self.max_body_bytes:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, receive_limited, send)


def header_timeout_protocol(header_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request headers take over `header_timeout` seconds
    (counted from the connection's start, or from the end of its previous response)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_request():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self._in_request():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self._in_request() and not self.transport.is_closing():
                self.logger.info("closing a connection whose request headers took over %g s", header_timeout)
                self.transport.close()

    return HeaderTimeoutProtocol
