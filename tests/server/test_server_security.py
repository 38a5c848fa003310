"""What the daemon protects: keys and texts stay out of the logs, CORS is off unless configured, loopback bind."""

from __future__ import annotations

import logging

import httpx

from tests.server.conftest import running_server
from vramlite.server.settings import Settings, load_settings

KEY = "sk-canary-7f3a9c"
PROMPT = "zebra canary"


def test_keys_prompts_and_outputs_stay_out_of_the_log(tiny_llama_dir, caplog):
    with caplog.at_level(logging.DEBUG), running_server(tiny_llama_dir, api_key=KEY) as srv:
        for key in (KEY, KEY + "x"):
            r = httpx.post(srv.url + "/generate", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0},
                           headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 401
        httpx.get(srv.url + "/info", headers={"Authorization": f"Bearer {KEY}"})
        too_large = httpx.post(srv.url + "/generate", content=b"x" * (2 << 20),
                               headers={"Authorization": f"Bearer {KEY}"})
        assert too_large.status_code == 413
    assert "route=/generate method=POST status=200" in caplog.text  # the request lines are there...
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request id=")]
    assert any("status=401" in line and "error=unauthorized" in line for line in lines)  # with what went wrong
    assert any("status=413" in line and "error=request_too_large" in line for line in lines)
    assert KEY not in caplog.text and "zebra" not in caplog.text  # ...without the key or the prompt
    assert "output=" not in caplog.text


def test_log_prompts_puts_texts_in_the_request_line(tiny_llama_dir, caplog):
    with caplog.at_level(logging.INFO, logger="vramlite.server"), \
            running_server(tiny_llama_dir, log_prompts=True) as srv:
        out = httpx.post(srv.url + "/generate", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).json()
    assert f"prompt={PROMPT!r} output={out['text']!r}" in caplog.text


def test_cors_is_off_unless_origins_are_configured(tiny_llama_dir):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with running_server(tiny_llama_dir) as srv:
        r = httpx.options(srv.url + "/generate", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(srv.url + "/generate", json={"prompt": "x", "max_tokens": 1}, headers={"Origin": "https://a.b"})
        assert "access-control-allow-origin" not in r.headers
    with running_server(tiny_llama_dir, cors_origins="https://app.example, https://other.example") as srv:
        r = httpx.options(srv.url + "/generate", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = httpx.options(srv.url + "/generate", headers={**preflight, "Origin": "https://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_binds_loopback_unless_told_otherwise():
    assert Settings().host == "127.0.0.1"
    assert load_settings({}, {}, "default").host == "127.0.0.1"
    assert load_settings({}, {"VRAMLITE_HOST": "0.0.0.0"}, "default").host == "0.0.0.0"
