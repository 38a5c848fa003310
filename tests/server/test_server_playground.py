"""The playground's server side: `/` and its files open and offline, `GET /stats` keyed and equal to /metrics."""

from __future__ import annotations

import re

import httpx

from tests.server.conftest import running_server
from tests.server.test_server_api import assert_error
from vramlite.server.playground import STATIC_DIR


def test_page_is_open_and_stats_are_keyed_and_match_metrics(tiny_llama_dir):
    with running_server(tiny_llama_dir, api_key="secret") as srv:
        page = httpx.get(srv.url + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"].startswith("default-src 'self'")
        assert page.headers["x-content-type-options"] == "nosniff"
        for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
            assert httpx.get(srv.url + asset).status_code == 200, asset
        assert_error(httpx.get(srv.url + "/static/missing.js"), 404, "not_found")
        assert_error(httpx.get(srv.url + "/stats"), 401, "unauthorized")

        key = {"Authorization": "Bearer secret"}
        r = httpx.post(srv.url + "/generate", json={"prompt": "x", "max_tokens": 3, "temperature": 0}, headers=key)
        stats = httpx.get(srv.url + "/stats", headers=key).json()
        assert set(stats) == {"time", "state", "metrics"} and stats["state"] == "ready"
        metrics = stats["metrics"]
        assert metrics["generation_tokens_total"] == r.json()["usage"]["completion_tokens"]
        assert metrics["offload_resident_layers"] == 2 and metrics["vram_used_bytes"] == 0
        for name in ("generation_tokens_total", "prompt_tokens_total", "pcie_h2d_bytes_total", "requests_running",
                     "requests_waiting", "vram_limit_bytes", "pcie_h2d_bandwidth_bytes_per_second"):
            assert metrics[name] == srv.metric(f"vramlite_{name}"), name
        assert not any(name.endswith("_created") or name.startswith("vramlite_") for name in metrics)


def test_static_files_load_nothing_from_elsewhere():
    """The page works offline: no URL in its files points off the server (the SVG namespace is a name)."""
    for path in STATIC_DIR.iterdir():
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)
