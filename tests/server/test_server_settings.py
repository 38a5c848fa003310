"""Settings precedence (flags > env > TOML profile > defaults), the shipped profiles, and `vramlite serve`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import httpx
import pytest

from vramlite.engine.layers.cpu_layout import CHOICES as CPU_LAYOUTS
from vramlite.server.settings import CONFIGS_DIR, Settings, SettingsError, load_settings, parse_size

REPO = Path(__file__).resolve().parents[2]


def test_flags_over_env_over_profile(tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text('port = 1111\nmax_queue = 3\nmax_batch_size = 2\ncontext = 64\n')
    env = {"VRAMLITE_PORT": "2222", "VRAMLITE_MAX_QUEUE": "4", "VRAMLITE_UNRELATED": "x", "HOME": "/root"}
    s = load_settings({"port": "3333", "model": None}, env, profile)
    assert (s.port, s.max_queue, s.max_batch_size, s.context) == (3333, 4, 2, 64)
    assert s.host == Settings().host  # from the defaults


def test_shipped_profiles():
    assert {p.stem for p in CONFIGS_DIR.glob("*.toml")} >= {"default", "gtx1060-6gb"}
    assert load_settings({}, {}, "default").model is None  # the shipped demo model
    small = load_settings({}, {}, "gtx1060-6gb")
    assert small.quantize == "int8" and small.memory_limit_bytes == 5 * 2**30 and small.max_batch_size <= 4


def test_cpu_layout_setting_takes_the_engines_layouts():
    """The setting's choices are written out for pydantic; they must stay the engine's (and the CLI's)."""
    assert get_args(Settings.model_fields["cpu_layout"].annotation) == CPU_LAYOUTS


def test_bad_values_name_the_setting_and_source(tmp_path):
    with pytest.raises(SettingsError, match=r"max_queue \(from environment\)"):
        load_settings({}, {"VRAMLITE_MAX_QUEUE": "-1"}, "default")
    with pytest.raises(SettingsError, match=r"port \(from flags\)"):
        load_settings({"port": "http"}, {}, "default")
    with pytest.raises(SettingsError) as e:
        load_settings({"memory_limit": "5XB"}, {}, "default")
    assert str(e.value).startswith("bad settings: memory_limit (from flags): '5XB' is not a size; write")
    with pytest.raises(SettingsError, match="no file"):
        load_settings({}, {}, "no-such-profile")
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense = 1\n")
    with pytest.raises(SettingsError, match="nonsense"):
        load_settings({}, {}, bad)


@pytest.mark.parametrize("text, size", [("5GiB", 5 * 2**30), ("512 MiB", 512 * 2**20), ("6GB", 6 * 10**9),
                                        ("1024", 1024), ("1.5kib", 1536)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_cli_serve_starts_and_stops_on_sigterm(tiny_llama_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "VRAMLITE_PORT": str(port), "VRAMLITE_DEVICE": "cpu", "VRAMLITE_API_KEY": "sk-cli-canary"}
    proc = subprocess.Popen([sys.executable, "-m", "vramlite.server.cli", "serve", "--model", str(tiny_llama_dir),
                             "--context", "64", "--log-level", "INFO"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "vramlite serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"prompt": "Hi", "max_tokens": 3}, timeout=30,
                       headers={"Authorization": "Bearer sk-cli-canary"})
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    log = proc.stderr.read()
    assert "event=model_loaded" in log and "context=64" in log and "event=drain_start" in log
    assert "Traceback" not in log
    assert "api_key=set" in log and "sk-cli-canary" not in log
    assert f"request id={r.headers['x-request-id']} route=/generate method=POST status=200" in log
