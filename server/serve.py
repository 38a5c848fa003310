"""`vramlite serve`: uvicorn around the app, with a SIGTERM that drains before it stops."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from functools import partial
from types import FrameType

import uvicorn

from server.app import create_app
from server.engine_loop import EngineLoop
from server.guards import header_timeout_protocol
from server.settings import Settings

log = logging.getLogger("vramlite.server")


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains (new requests get 503, running ones finish within `drain_timeout`),
    then stops as uvicorn does; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, engine_loop: EngineLoop, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine_loop = engine_loop
        self.drain_timeout = drain_timeout
        self.draining = False

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
        if not self.engine_loop.drain_soon(self.drain_timeout, then=stop):
            stop()


def build_server(settings: Settings, engine_loop: EngineLoop | None = None) -> DrainingServer:
    """The app and its uvicorn server for `settings`, not started. It stops if the model fails to load."""
    app = create_app(settings, engine_loop)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=settings.drain_timeout,
                            http=header_timeout_protocol(settings.header_timeout))
    server = DrainingServer(config, app.state.runtime.loop, settings.drain_timeout)
    server.engine_loop.on_load_failed = partial(setattr, server, "should_exit", True)
    return server


def serve(settings: Settings, sock: socket.socket | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (exit status 0) or a model that fails to load (1)."""
    server = build_server(settings)
    server.run(sockets=[sock] if sock else None)
    if server.engine_loop.load_error is not None:
        log.error("event=exit status=1 reason=%s", server.engine_loop.load_error)
        return 1
    return 0
