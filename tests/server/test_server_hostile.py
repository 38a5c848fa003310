"""Hostile input: slow and oversized requests, malformed JSON and text, special tokens, odd sampling fields.
Every one gets an answer with the contract's error body (or a normal reply), never a 500 or a hang."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.server.conftest import running_server
from tests.server.test_server_api import assert_error


@pytest.fixture(scope="module")
def guarded(tiny_llama_dir):
    with running_server(tiny_llama_dir, header_timeout=0.5, body_timeout=0.5, max_header_bytes=4096) as srv:
        yield srv


def connect(srv) -> socket.socket:
    host, port = srv.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def closed_after(sock: socket.socket, drip: bytes, every: float, limit: float) -> float:
    """Send `drip` every `every` s until the server closes the connection; the seconds that took."""
    start = time.monotonic()
    sock.settimeout(every)
    while time.monotonic() - start < limit:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            pass
        try:
            sock.sendall(drip)
        except OSError:  # reset by the server
            return time.monotonic() - start
    raise AssertionError(f"the connection was still open after {limit} s")


def test_slow_loris_headers_are_cut_off(guarded):
    with connect(guarded) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\n")
        assert closed_after(sock, b"X-Drip: 1\r\n", every=0.1, limit=5) < 3
    with connect(guarded) as sock:  # a connection that never sends anything
        assert closed_after(sock, b"", every=0.1, limit=5) < 3


def test_keep_alive_connection_cannot_drip_its_next_request(guarded):
    with connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200 OK" in sock.recv(65536)
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        assert closed_after(sock, b"X-Drip: 1\r\n", every=0.1, limit=5) < 3


def test_stalled_body_is_408(guarded):
    with connect(guarded) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        sock.settimeout(5)
        reply = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its 408
            reply += chunk
    head, body = reply.decode().split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 408")
    assert json.loads(body)["error"]["type"] == "request_timeout"


def test_oversized_headers_are_431(guarded):
    r = httpx.post(guarded.url + "/generate", json={"prompt": "x"}, headers={"X-Big": "a" * 5000})
    assert_error(r, 431, "headers_too_large")


@pytest.mark.parametrize("body, why", [
    (b'{"prompt": "\xff\xfe"}', "invalid UTF-8"),
    (b'{"prompt": "x", "stop": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested 50 000 deep"),
    (b'{"prompt": "x", "seed": 1' + b"0" * 5000 + b"}", "a 5000-digit integer"),
])
def test_malformed_json_is_a_client_error(guarded, body, why):
    r = httpx.post(guarded.url + "/generate", content=body, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, why
    assert set(r.json()["error"]) == {"type", "message"}


def test_a_key_repeated_ten_thousand_times_is_valid_json(guarded):
    body = b'{"max_tokens": 1' + b', "prompt": "y"' * 10_000 + b"}"
    r = httpx.post(guarded.url + "/generate", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_control_characters_and_bidi_marks_are_text(guarded):
    with guarded.client() as c:
        r = c.post("/generate", json={"prompt": "\x00\x01\x1b[31m\u202e\ufeff\r\n", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_special_tokens_in_a_prompt_are_text_unless_allowed(tiny_llama_dir, guarded):
    body = {"prompt": "</s>", "max_tokens": 3, "temperature": 0}
    with guarded.client() as c:
        as_text = c.post("/generate", json=body).json()
    assert as_text["usage"]["prompt_tokens"] > 2  # BOS + the pieces of "</s>", not BOS + EOS
    with running_server(tiny_llama_dir, allow_special_tokens=True) as srv, srv.client() as c:
        assert c.post("/generate", json=body).json()["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize("fields, status", [
    ({"stop": [""]}, 422), ({"stop": ["x" * 100_000]}, 422), ({"stop": ["a"] * 1000}, 422), ({"stop": ""}, 422),
    ({"max_tokens": 0}, 200), ({"max_tokens": -1}, 422), ({"max_tokens": 10**9}, 422),
    ({"temperature": float("1e308")}, 422), ({"seed": 2**64}, 422),
])
def test_odd_sampling_fields(guarded, fields, status):
    with guarded.client() as c:
        r = c.post("/generate", content=json.dumps({"prompt": "x", **fields}),
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["text"] == "" and r.json()["usage"]["completion_tokens"] == 0
