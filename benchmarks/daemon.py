"""`vramlite serve` in a subprocess on a free loopback port, for the benchmarks that load it over HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from vramlite import models as demo_models

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 120


@dataclass(frozen=True)
class Daemon:
    url: str
    pid: int

    def rss_bytes(self) -> int:
        """The daemon's resident set size."""
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def daemon(model: Path | None = None, **settings: object) -> Iterator[Daemon]:
    """The daemon serving `model` (default: the demo model) with `settings` as flags (`max_queue=4` →
    `--max-queue 4`); yields it once /health says ready, and stops it with SIGTERM afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "vramlite.server.cli", "serve", "--model", str(model or demo_models.path()),
           "--port", str(port), "--log-level", "WARNING"]
    for name, value in settings.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not _ready(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"the daemon did not become ready:\n{log.read()}")
                time.sleep(0.2)
            yield Daemon(url, proc.pid)
        finally:
            proc.terminate()
            proc.wait(60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
