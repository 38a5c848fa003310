"""The engine thread under load: batching, disconnects, admission, timeouts, faults, drain, metrics."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse, connect_sse
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import running_server, slow_loader, slowed
from tests.server.test_server_api import assert_error
from tests.server.test_server_faults import wait_until
from vramlite.server.runtime import engine_loader

PROMPTS = ["The quick brown fox", "Hello, world!", "床前明月光", "Numbers 12345", "A fortune cookie says",
           "白日依山尽", "Whitespace runs", "春眠不觉晓"]
CONCURRENT_PROMPTS = [f"{prompt} ({n})" + " and then" * (n % 5) for n, prompt in enumerate(PROMPTS * 4)]
DESIGN_SERIES = [
    "pcie_h2d_bytes_total", "pcie_d2h_bytes_total", "pcie_h2d_bandwidth_bytes_per_second",
    "offload_stall_seconds_total", "vram_used_bytes", "vram_reserved_bytes", "vram_total_bytes",
    "vram_limit_bytes", "kv_cache_usage_ratio", "offload_resident_layers", "offload_streamed_layers",
    "host_pinned_bytes", "requests_running", "requests_waiting", "requests_total",
    "time_to_first_token_seconds_count", "inter_token_latency_seconds_count", "request_duration_seconds_count",
    "queue_time_seconds_count", "prompt_tokens_total", "generation_tokens_total",
]


async def stream_generate(client: httpx.AsyncClient, prompt: str) -> tuple[list[int], dict[str, Any]]:
    """A greedy streamed /generate: the token ids of its chunks, and its final chunk (text, reason, usage)."""
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}
    async with aconnect_sse(client, "POST", "/generate", json=body) as source:
        events = [event.data async for event in source.aiter_sse()]
    assert events[-1] == "[DONE]"
    *tokens, final = [json.loads(data) for data in events[:-1]]
    return [chunk["token"]["id"] for chunk in tokens], final


def test_concurrent_streams_get_their_single_request_output(tiny_llama_dir):
    """32 clients at once, batched 8 at a time (the rest join as slots free up), each get exactly what their
    prompt gives alone: batching never mixes sequences."""

    async def run() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            alone = [await stream_generate(client, p) for p in CONCURRENT_PROMPTS]
            together = await asyncio.gather(*(stream_generate(client, p) for p in CONCURRENT_PROMPTS))
        return alone, together

    with running_server(tiny_llama_dir, max_batch_size=8, max_queue=len(CONCURRENT_PROMPTS)) as srv:
        alone, together = asyncio.run(run())
        assert together == alone
        assert len({final["text"] for _, final in alone}) > 1  # distinct prompts, distinct outputs
        # Some forward passes sampled for more than 4 sequences at once.
        assert srv.metric("vramlite_batch_size_count") > srv.metric("vramlite_batch_size_bucket", le="4.0")


def test_metrics_series_present_and_rising(server, client):
    def samples() -> dict[str, float]:
        text = client.get("/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if not s.labels or s.name == "vramlite_requests_total"}

    client.post("/generate", json={"prompt": "Hello", "max_tokens": 4})
    before = samples()
    assert all(f"vramlite_{name}" in before for name in DESIGN_SERIES), set(DESIGN_SERIES) - set(before)
    assert before["vramlite_vram_used_bytes"] == 0 and before["vramlite_pcie_h2d_bytes_total"] == 0
    assert before["vramlite_offload_resident_layers"] == 2
    client.post("/generate", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0})
    after = samples()
    for name in ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
                 "queue_time_seconds_count", "request_duration_seconds_count"):
        assert after[f"vramlite_{name}"] > before[f"vramlite_{name}"], name
    assert server.metric("vramlite_requests_total", route="/generate", status="200") >= 2
    assert server.metric("vramlite_requests_running") == 0


def test_disconnect_frees_the_slot(tiny_llama_dir):
    with running_server(tiny_llama_dir, load=slow_loader(0.02)) as srv, srv.client() as c:
        body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": True}
        with c.stream("POST", "/generate", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert srv.metric("vramlite_requests_running") == 1
        deadline = time.monotonic() + 1.0  # the full request would take 100 × 20 ms
        while srv.metric("vramlite_requests_running") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.metric("vramlite_requests_running") == 0
        assert srv.metric("vramlite_generation_tokens_total") < 50


def test_a_disconnect_frees_every_choice(tiny_llama_dir):
    """OpenAI's n: the choices run as requests of their own, and a client that hangs up ends them all, streamed
    or not (a client whose read times out)."""
    with running_server(tiny_llama_dir, load=slow_loader(0.1)) as srv, srv.client() as c:
        body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "n": 3}
        with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()  # kept: a dropped line iterator would close the response
            assert next(line for line in lines if line.startswith("data:"))
            wait_until(lambda: srv.metric("vramlite_requests_running") == 3)  # the gauge follows the step
        # 4 s: not the 100 × 100 ms a choice left running takes, with room for a loaded machine
        wait_until(lambda: srv.metric("vramlite_requests_running") == 0, timeout=4.0)

        def impatient() -> None:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/completions", json=body, timeout=1.0)

        client = threading.Thread(target=impatient)
        client.start()
        wait_until(lambda: srv.metric("vramlite_requests_running") == 3)
        client.join()
        wait_until(lambda: srv.metric("vramlite_requests_running") == 0, timeout=4.0)
        assert srv.metric("vramlite_generation_tokens_total") < 300


def test_n_choices_take_their_room_all_or_none(tiny_llama_dir):
    with running_server(tiny_llama_dir, load=slow_loader(0.02), max_batch_size=1, max_queue=2) as srv, \
            srv.client() as c:
        body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": True}
        with c.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            over = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "n": 3})
            assert_error(over, 429, "queue_full")
            assert srv.metric("vramlite_requests_waiting") + srv.metric("vramlite_requests_running") == 1


def test_queue_full_is_429_with_retry_after(tiny_llama_dir):
    with running_server(tiny_llama_dir, load=slow_loader(0.02), max_batch_size=1, max_queue=1) as srv:
        body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": True}  # greedy: no early EOS
        with srv.client() as a, srv.client() as b, a.stream("POST", "/generate", json=body) as ra, \
                b.stream("POST", "/generate", json=body) as rb:
            assert ra.status_code == rb.status_code == 200
            r = httpx.post(srv.url + "/generate", json={"prompt": "Hello"})
            assert_error(r, 429, "queue_full")
            assert int(r.headers["retry-after"]) >= 1
        assert srv.metric("vramlite_requests_total", route="/generate", status="429") == 1


def test_request_timeout_is_504(tiny_llama_dir):
    # Greedy, so no sampled EOS can end the request inside the timeout; 0.1 s a step, so it takes 2 steps.
    body = {"prompt": "Hi", "max_tokens": 100, "temperature": 0}
    with running_server(tiny_llama_dir, load=slow_loader(0.1), request_timeout=0.2) as srv, srv.client() as c:
        assert_error(c.post("/generate", json=body), 504, "timeout")
        with connect_sse(c, "POST", "/generate", json={**body, "stream": True}) as s:
            last = list(s.iter_sse())[-1]
        assert last.event == "error" and json.loads(last.data)["error"]["type"] == "timeout"


def test_api_key(tiny_llama_dir):
    with running_server(tiny_llama_dir, api_key="secret", quantize="int8") as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"},
                        {"Authorization": "Bearer wrong", "x-api-key": "secret"}):
            r = httpx.post(srv.url + "/generate", json={"prompt": "x", "max_tokens": 1}, headers=headers)
            assert_error(r, 401, "unauthorized")
            assert_error(httpx.get(srv.url + "/info", headers=headers), 401, "unauthorized")
        authorized = {"Authorization": "Bearer secret"}
        r = httpx.post(srv.url + "/generate", json={"prompt": "x", "max_tokens": 1}, headers=authorized)
        assert r.status_code == 200
        r = httpx.post(srv.url + "/generate", json={"prompt": "x", "max_tokens": 1}, headers={"x-api-key": "secret"})
        assert r.status_code == 200  # Anthropic's clients send the key so
        info = httpx.get(srv.url + "/info", headers=authorized).json()
        assert info["quantization"] == {"requested": "int8", "active": "int8"}


def test_503_while_loading(tiny_llama_dir):
    release = threading.Event()

    def gated(settings):
        load = engine_loader(settings)
        return lambda: release.wait(30) and load()

    with running_server(tiny_llama_dir, load=gated, wait=False) as srv:
        assert_error(httpx.get(srv.url + "/health"), 503, "loading")
        r = httpx.post(srv.url + "/generate", json={"prompt": "x"})
        assert_error(r, 503, "loading")
        assert "retry-after" in r.headers
        assert httpx.get(srv.url + "/info").json()["state"] == "loading"
        release.set()
        srv.wait_ready()
        assert httpx.post(srv.url + "/generate", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_engine_fault_is_500_and_unhealthy(tiny_llama_dir):
    def broken(settings):
        def load():
            engine = engine_loader(settings)()
            engine.step = lambda: 1 / 0
            return engine
        return load

    with running_server(tiny_llama_dir, load=broken) as srv, srv.client() as c:
        message = assert_error(c.post("/generate", json={"prompt": "x"}), 500, "internal_error")
        assert "ZeroDivision" not in message and "request id" in message
        assert_error(c.get("/health"), 503, "engine_failed")
        assert_error(c.post("/generate", json={"prompt": "x"}), 503, "engine_failed")


def test_sigterm_drains(tiny_llama_dir):
    with running_server(tiny_llama_dir, load=slow_loader(0.01), drain_timeout=10) as srv, srv.client() as c:
        body = {"prompt": "Hello", "max_tokens": 40, "temperature": 0, "stream": True}
        with connect_sse(c, "POST", "/generate", json=body) as source:
            events = source.iter_sse()
            next(events)
            srv.server.handle_exit(signal.SIGTERM, None)
            time.sleep(0.05)
            assert_error(httpx.post(srv.url + "/generate", json={"prompt": "x"}), 503, "shutting_down")
            assert_error(httpx.get(srv.url + "/health"), 503, "shutting_down")
            rest = [e.data for e in events]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["usage"]["completion_tokens"] == 40
        srv.thread.join(10)
        assert not srv.thread.is_alive()


def test_slowed_engine_keeps_outputs(tiny_llama_dir):
    """The test helper itself: slowing steps must not change what the engine produces."""
    from vramlite.engine import Engine

    fast = Engine.from_dir(tiny_llama_dir, device="cpu", context=128)
    slow = slowed(lambda: Engine.from_dir(tiny_llama_dir, device="cpu", context=128), 0.001)()
    assert fast.generate("Hi", max_tokens=5, temperature=0).text == slow.generate("Hi", max_tokens=5,
                                                                                 temperature=0).text
