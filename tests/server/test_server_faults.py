"""Faults injected for real while the daemon serves: a request failing in the engine, disconnects at every
point of a stream. The daemon keeps serving, answers every admitted request, and frees what it held."""

from __future__ import annotations

import json
import signal
import time

from httpx_sse import connect_sse

from tests.server.conftest import running_server, slowed
from tests.server.test_server_api import assert_error
from vramlite.server.runtime import engine_loader

POISON = 300  # a token id whose presence in a forward pass makes it raise


def poisoned_loader(step_delay: float):
    """The real engine, slowed, whose forward pass raises for any chunk holding POISON."""

    def loader(settings):
        load = slowed(engine_loader(settings), step_delay)

        def load_poisoned():
            engine = load()
            forward = engine.runner.forward

            def poisoned(chunks, **kwargs):
                if any(POISON in c.token_ids for c in chunks):
                    raise RuntimeError("injected fault")
                return forward(chunks, **kwargs)

            engine.runner.forward = poisoned
            return engine

        return load_poisoned

    return loader


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_request_failing_in_the_engine_gets_500_and_the_others_go_on(tiny_llama_dir):
    with running_server(tiny_llama_dir, load=poisoned_loader(0.02)) as srv, srv.client() as c:
        srv.loop.recovery_s = 1.0
        body = {"prompt": "Hello", "max_tokens": 30, "temperature": 0, "stream": True}
        with connect_sse(c, "POST", "/generate", json=body) as source:
            events = source.iter_sse()
            next(events)
            r = c.post("/v1/completions", json={"prompt": [5, POISON, 7], "max_tokens": 5})
            message = assert_error(r, 500, "internal_error")
            assert r.headers["x-request-id"] in message and "RuntimeError: injected fault" in message
            health = c.get("/health")
            assert_error(health, 503, "degraded")
            assert int(health.headers["retry-after"]) >= 1
            with connect_sse(c, "POST", "/v1/completions",
                             json={"prompt": [POISON], "max_tokens": 5, "stream": True}) as bad:
                last = list(bad.iter_sse())[-1]
            assert last.event == "error" and json.loads(last.data)["error"]["type"] == "internal_error"
            rest = [e.data for e in events]
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["usage"]["completion_tokens"] == 30
        assert c.post("/generate", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200  # serves on
        assert srv.metric("vramlite_engine_faults_total") == 2
        engine = srv.loop.engine
        assert engine.runner.cache.num_free_slots == 4 and not engine.has_unfinished()
        wait_until(lambda: c.get("/health").status_code == 200, timeout=3)


def test_a_disconnect_at_any_point_of_a_stream_frees_the_request(tiny_llama_dir):
    """Before the first token (still queued), mid-stream, and while the final event is on its way."""
    step = 0.03
    with running_server(tiny_llama_dir, load=lambda s: slowed(engine_loader(s), step), max_batch_size=1) as srv, \
            srv.client() as c:
        engine = srv.loop.engine

        def idle() -> bool:
            return not engine.has_unfinished() and srv.metric("vramlite_requests_waiting") == 0

        long = {"prompt": "Hello", "max_tokens": 60, "temperature": 0, "stream": True}
        with connect_sse(c, "POST", "/generate", json=long) as running:
            first = running.iter_sse()
            next(first)
            # Queued behind the running request: it hangs up before its first token.
            with srv.client() as q, q.stream("POST", "/generate", json=long) as queued:
                assert queued.status_code == 200
                wait_until(lambda: srv.metric("vramlite_requests_waiting") == 1)
            wait_until(lambda: srv.metric("vramlite_requests_waiting") == 0, timeout=2 * step + 1)
        # Mid-stream: the running request's reader left when the block above closed it.
        wait_until(idle, timeout=2 * step + 1)
        assert srv.metric("vramlite_generation_tokens_total") < 30

        # During the final event: read every token event, hang up before [DONE].
        short = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
        with connect_sse(c, "POST", "/generate", json=short) as source:
            for event in source.iter_sse():
                if "finish_reason" in json.loads(event.data):
                    break
        wait_until(idle, timeout=2 * step + 1)
        assert engine.runner.cache.num_free_slots == 1
        assert c.post("/generate", json={"prompt": "Hi", "max_tokens": 3}).status_code == 200


def test_sigterm_ends_streams_that_outlast_the_drain_with_a_final_error_event(tiny_llama_dir):
    with running_server(tiny_llama_dir, load=lambda s: slowed(engine_loader(s), 0.05), drain_timeout=0.3) as srv, \
            srv.client() as c:
        body = {"prompt": "Hello", "max_tokens": 100, "temperature": 0, "stream": True}
        with connect_sse(c, "POST", "/generate", json=body) as source:
            events = source.iter_sse()
            next(events)
            started = time.monotonic()
            srv.server.handle_exit(signal.SIGTERM, None)
            rest = list(events)
        assert time.monotonic() - started < 3
        assert rest[-1].event == "error"
        assert json.loads(rest[-1].data)["error"]["type"] == "shutting_down"
        srv.thread.join(10)
        assert not srv.thread.is_alive()
