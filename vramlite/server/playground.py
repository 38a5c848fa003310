"""The web playground at `/`: static files shipped in the package, served without the API key.

The page holds no secret; every call it makes (`/generate`, `/fill_blank`, `/info`, `/stats`) sends the key
the user typed, so the protected routes stay protected.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Everything from this origin only: no inline script or style, no third-party fetch, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
                               "object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class PlaygroundFiles(StaticFiles):
    """StaticFiles whose replies carry the playground's security headers."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope,
                      status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(SECURITY_HEADERS)
        return response


def install_playground(app: FastAPI) -> None:
    """`GET /` answers the page, `/static/*` its script, style and icon."""
    app.mount("/static", PlaygroundFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)
