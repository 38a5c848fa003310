"""The one error body of the HTTP contract, `{"error": {"type", "message"}}`, for every status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from vramlite.server.schemas import error_message

log = logging.getLogger("vramlite.server")

# Types for the statuses Starlette raises by itself (unknown route, wrong method, body too large...).
HTTP_ERROR_TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                    408: "request_timeout", 413: "request_too_large", 415: "unsupported_media_type"}


class ApiError(Exception):
    """An error answered with our body: `status`, a snake_case `type` and a message saying what to fix."""

    def __init__(self, status: int, type: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers

    def body(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "message": self.message}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        parts.append(f"{where}: {error_message(err)}")
    return "; ".join(parts)


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return ApiError(422, "validation_error", _validation_message(exc)).response()


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}; see /docs"
    return ApiError(exc.status_code, HTTP_ERROR_TYPES.get(exc.status_code, "http_error"), message,
                    dict(exc.headers or {})).response()


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "-")
    log.error("request_id=%s unhandled error", request_id, exc_info=exc)
    return ApiError(500, "internal_error", f"internal error; the server log has the details under request id "
                                           f"{request_id}").response()


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error, validation and routing ones included, with the contract's body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
