"""The one error body of the HTTP contract, `{"error": {"type", "message"}}`, for every status; on Anthropic's
routes (/v1/messages...) in Anthropic's shape, which holds it: `{"type": "error", "error": {"type", "message"}}`
with Anthropic's type for the status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import Scope

from vramlite.server.schemas import error_message

log = logging.getLogger("vramlite.server")

# Types for the statuses Starlette raises by itself (unknown route, wrong method, body too large...).
HTTP_ERROR_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                    408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type"}

ANTHROPIC_ROUTES = "/v1/messages"  # and below
# Anthropic's error types by status (its API answers validation errors 400, not 422)
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 413: "request_too_large", 422: "invalid_request_error",
                   429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


class ApiError(Exception):
    """An error answered with our body: `status`, a snake_case `type` and a message saying what to fix."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers

    @property
    def anthropic_type(self) -> str:
        """The type Anthropic's API gives an error of this status."""
        return ANTHROPIC_TYPES.get(self.status, "api_error")

    def body(self, path: str = "") -> dict[str, Any]:
        """The error body for a request to `path`."""
        if path.startswith(ANTHROPIC_ROUTES):
            return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}
        return {"error": {"type": self.type, "message": self.message}}

    def response(self, scope: Scope) -> JSONResponse:
        """The reply to the request of `scope`, whose log line will name this error's type."""
        scope.setdefault("state", {})["error"] = self.type
        return JSONResponse(self.body(scope["path"]), self.status, headers=self.headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        parts.append(f"{where}: {error_message(err)}")
    return "; ".join(parts)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response(request.scope)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return ApiError(422, "validation_error", _validation_message(exc)).response(request.scope)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs"
    return ApiError(exc.status_code, HTTP_ERROR_TYPES.get(exc.status_code, "http_error"), message,
                    dict(exc.headers or {})).response(request.scope)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "-")
    log.error("request_id=%s unhandled error", request_id, exc_info=exc)
    return ApiError(500, "internal_error", f"internal error; the server log has the details under request id "
                                           f"{request_id}").response(request.scope)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, validation and routing ones included, with the contract's body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
