"""`vramlite serve`: uvicorn around the app, with a SIGTERM that drains before it stops."""

from __future__ import annotations

import logging
import socket
from functools import partial
from types import FrameType

import uvicorn

from server.app import create_app
from server.engine_loop import EngineLoop
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

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        stop = partial(super().handle_exit, sig, frame)
        if self.draining:
            stop()
            return
        self.draining = True
        if not self.engine_loop.drain_soon(self.drain_timeout, then=stop):
            stop()


def build_server(settings: Settings, engine_loop: EngineLoop | None = None) -> DrainingServer:
    """The app and its uvicorn server for `settings`, not started."""
    app = create_app(settings, engine_loop)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level.lower(), timeout_graceful_shutdown=settings.drain_timeout)
    return DrainingServer(config, app.state.runtime.loop, settings.drain_timeout)


def serve(settings: Settings, sock: socket.socket | None = None) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    build_server(settings).run(sockets=[sock] if sock else None)
