"""The FastAPI app: request ids and the access log, the error handlers, the size guards, and the routes of
`vramlite.server.routes` (one module per API family; what they share is in `serving`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sse_starlette.sse import AppStatus
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vramlite import __version__
from vramlite.server.engine_loop import EngineLoop, Generation
from vramlite.server.errors import install_error_handlers
from vramlite.server.guards import RequestLimitsMiddleware
from vramlite.server.metrics import Metrics
from vramlite.server.playground import install_playground
from vramlite.server.routes import native, openai_compat, replies, system
from vramlite.server.runtime import Runtime, engine_loader, fill_model_dir, make_engine_loop
from vramlite.server.settings import Settings

log = logging.getLogger("vramlite.server")
ENGINE_ROUTES = frozenset({"/generate", "/fill_blank", "/v1/completions", "/v1/chat/completions", "/v1/responses",
                           "/v1/messages", "/v1/embeddings"})  # logged at INFO, one line per request
MAX_REQUEST_ID_CHARS = 64


class RequestLogMiddleware:
    """Gives each request an id (`X-Request-Id`, echoed back), counts it, and logs one line when it ends."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_prompts: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if given.isprintable() and 0 < len(given) <= MAX_REQUEST_ID_CHARS else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, start=start)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status, time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, total_s: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(route, str(status)).inc()
        gens: list[Generation] = state.get("generations", [])
        gen = gens[0] if gens else None  # the timings of the first choice (OpenAI's n: the others are alike)
        if gen is not None:
            self.metrics.request_duration.observe(total_s)
        level = logging.INFO if route in ENGINE_ROUTES else logging.DEBUG
        if not log.isEnabledFor(level):
            return

        def since_arrival(t: float | None) -> str:
            return "-" if gen is None or t is None else f"{t - gen.arrival:.4f}"

        error = state.get("error")
        texts = ""
        if self.log_prompts and gen is not None:
            outputs = ["".join(g.output) for g in gens]
            texts = f" prompt={state['tokenizer'].decode(gen.prompt_ids)!r} output=" \
                    f"{outputs[0] if len(outputs) == 1 else outputs!r}"
        finish = ",".join(g.finish_reason or "-" for g in gens) or "-"
        log.log(level, "request id=%s route=%s method=%s status=%d prompt_tokens=%s completion_tokens=%s "
                "finish_reason=%s error=%s queue_s=%s ttft_s=%s total_s=%.4f%s", state["request_id"], route,
                scope["method"], status, gen.num_prompt_tokens if gen else "-",
                sum(g.num_tokens for g in gens) if gens else "-", finish, error or "-",
                since_arrival(gen and gen.scheduled_at), since_arrival(gen and gen.first_token_at), total_s, texts)


def create_app(settings: Settings, engine_loop: EngineLoop | None = None) -> FastAPI:
    """The daemon's ASGI app. The models load on engine threads at startup; until then routes answer 503.

    `engine_loop` defaults to one that loads the model the settings name (tests pass their own); a second
    loop serves /fill_blank when the settings name a fill model.
    """
    engine_loop = engine_loop or make_engine_loop(settings)
    fill_dir = fill_model_dir(settings)
    fill_loop = None if fill_dir is None else make_engine_loop(settings, engine_loader(settings, fill_dir),
                                                               engine_loop.metrics)
    rt = Runtime(settings, engine_loop, fill_loop)
    engine_loop.metrics.watch(rt.loops)
    # sse-starlette would end every stream on the first SIGTERM (a process-wide flag); our drain lets
    # running streams finish, then ends the stragglers itself.
    AppStatus.disable_automatic_graceful_drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for loop in rt.loops:
            loop.start(asyncio.get_running_loop())
        yield
        await asyncio.gather(*(loop.stop() for loop in rt.loops))

    app = FastAPI(title="vramlite", version=__version__, lifespan=lifespan,
                  description="Run big language models on one small GPU. Errors always have the body "
                              '`{"error": {"type", "message"}}` (under /v1/messages Anthropic\'s, which adds '
                              '`"type": "error"` and names its types).')
    app.state.runtime = rt
    install_error_handlers(app)
    app.add_middleware(RequestLimitsMiddleware, max_header_bytes=settings.max_header_bytes,
                       max_body_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-Api-Key", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    app.add_middleware(RequestLogMiddleware, metrics=engine_loop.metrics,  # outermost: it sees every status
                       log_prompts=settings.log_prompts)
    app.include_router(system.public)
    for routes in (system, native, openai_compat, replies):
        app.include_router(routes.router)
    install_playground(app)
    return app
