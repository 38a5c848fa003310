"""Chromium (Debian's, driven by Playwright) against a live daemon serving the demo model.

Without /usr/bin/chromium or the playwright package the browser tests skip, unless the `CI` environment
variable is set: then they fail, so CI cannot pass without running them. Screenshots go to
`$VRAMLITE_ARTIFACTS` (default: a pytest temporary directory), printed at the end of the run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")  # not on a GPU host with only the engine's packages: see conftest

from tests.server.conftest import Running, running_server, slow_loader
from vramlite import models as demo_models
from vramlite.server.settings import load_settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_DELAY_S = 0.04  # paces the demo model to ~25 tokens/s so a stream can be watched and stopped
TIMEOUT_MS = 20_000
_artifacts = pytest.StashKey[Path]()


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser tests (scripts/test.sh installs Chromium as root on Debian)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Chromium, closed with its module: while Playwright's sync API runs, this thread has a running asyncio
    loop, which would break later tests that call asyncio.run."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    if not CHROMIUM.is_file():
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def daemon() -> Iterator[Running]:
    """The default profile's daemon on the demo model, paced, with one batch slot and no queue (so a second
    request gets a 429), under a memory limit that keeps some of its 6 layers resident and streams the others
    (the smallest budget that works is ≈21.6 MiB, each layer ≈2.8 MiB)."""
    flags = {"device": "cpu", "context": 128, "max_batch_size": 1, "max_queue": 0, "memory_limit": "29MiB",
             "log_level": "WARNING"}
    settings = load_settings(flags, env={})
    with running_server(demo_models.path(), load=slow_loader(STEP_DELAY_S),
                        **settings.model_dump(exclude={"host", "port", "model"})) as running:
        yield running


@pytest.fixture(scope="module")
def fill_daemon() -> Iterator[Running]:
    """The demo LLaMA with the demo T5 answering /fill_blank, as a fresh `vramlite serve` has them."""
    with running_server(demo_models.path(), fill_model=str(demo_models.path(demo_models.FILL_BLANK)),
                        device="cpu", context=128, log_level="WARNING") as running:
        yield running


@pytest.fixture(scope="session")
def artifacts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("VRAMLITE_ARTIFACTS")
    path = Path(given) / "playground" if given else tmp_path_factory.mktemp("playground")
    path.mkdir(parents=True, exist_ok=True)
    request.config.stash[_artifacts] = path
    return path


@pytest.fixture
def page(browser: Any, daemon: Running) -> Iterator[Any]:
    """A fresh desktop-sized tab on the playground; fails the test on any script error or CSP violation."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and "status of 4" not in m.text
            and problems.append(f"console error: {m.text}"))
    page.goto(daemon.url + "/")
    yield page
    context.close()
    assert not problems, problems


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    path = config.stash.get(_artifacts, None)
    if path is not None:
        terminalreporter.write_line(f"playground screenshots: {path}")
