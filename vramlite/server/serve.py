"""`vramlite serve`: uvicorn around the app, with a SIGTERM that drains before it stops."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator, Sequence
from functools import partial
from types import FrameType

import uvicorn

from vramlite.server.app import create_app
from vramlite.server.engine_loop import EngineLoop
from vramlite.server.guards import header_timeout_protocol
from vramlite.server.settings import Settings

log = logging.getLogger("vramlite.server")


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains every engine loop (new requests get 503, running ones finish within
    `drain_timeout`), then stops as uvicorn does; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, loops: Sequence[EngineLoop], drain_timeout: float) -> None:
        super().__init__(config)
        self.loops = loops
        self.drain_timeout = drain_timeout
        self.draining = False
        for loop in loops:
            loop.on_load_failed = partial(setattr, self, "should_exit", True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # A drained stop is a clean exit (status 0): uvicorn would re-raise the signal and die by it.
            self._captured_signals.clear()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        stop = partial(super().handle_exit, sig, frame)
        if self.draining:
            stop()
            return
        self.draining = True
        remaining = len(self.loops)

        def drained() -> None:
            nonlocal remaining
            remaining -= 1
            if not remaining:
                stop()

        for loop in self.loops:
            if not loop.drain_soon(self.drain_timeout, then=drained):
                drained()

    @property
    def load_error(self) -> str | None:
        """Why a model failed to load, if one did."""
        return next((loop.load_error for loop in self.loops if loop.load_error), None)


def build_server(settings: Settings, engine_loop: EngineLoop | None = None) -> DrainingServer:
    """The app and its uvicorn server for `settings`, not started. It stops if a model fails to load."""
    app = create_app(settings, engine_loop)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=settings.drain_timeout,
                            http=header_timeout_protocol(settings.header_timeout))
    return DrainingServer(config, app.state.runtime.loops, settings.drain_timeout)


def serve(settings: Settings, sock: socket.socket | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (exit status 0) or a model that fails to load (1)."""
    server = build_server(settings)
    server.run(sockets=[sock] if sock else None)
    if server.load_error is not None:
        log.error("event=exit status=1 reason=%s", server.load_error)
        return 1
    return 0
