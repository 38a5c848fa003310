"""`POST /fill_blank` over HTTP: validation, the JSON and SSE replies of a fill-in-the-middle model, refusals."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server.conftest import Running, running_server, slow_loader
from tests.server.test_server_api import assert_error, sse_events
from vramlite import models as demo_models
from vramlite.engine.fill_blank import MAX_BLANKS, FillRequest, fill_format

PREFIX, SUFFIX = "今天天气", "，我们去公园。"
PROMPT = PREFIX + "<span>" + SUFFIX
SEEDED = {"max_tokens": 8, "temperature": 0.9, "top_k": 50, "seed": 11}


@pytest.fixture(scope="module")
def fim_server(fim_llama_dir: Path) -> Iterator[Running]:
    with running_server(fim_llama_dir) as running:
        yield running


@pytest.fixture
def client(fim_server: Running) -> Iterator[httpx.Client]:
    with fim_server.client() as c:
        yield c


@pytest.mark.parametrize("count", [0, MAX_BLANKS + 1])
def test_no_span_or_too_many_is_422_naming_the_count(client, count):
    r = client.post("/fill_blank", json={"prompt": "x" + "<span>y" * count})
    message = assert_error(r, 422, "validation_error")
    assert message == f"prompt: the prompt must hold 1 to {MAX_BLANKS} <span> blanks; it holds {count}"


def test_more_than_one_span_on_a_fim_model_is_422_naming_count_and_limit(client):
    message = assert_error(client.post("/fill_blank", json={"prompt": "a<span>b<span>c"}), 422, "validation_error")
    assert "exactly 1" in message and "fill-in-the-middle" in message and "holds 2" in message


@pytest.mark.parametrize("body, where", [
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": PROMPT, "tempreature": 1}, "tempreature"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "max_tokens": 129}, "context"),
])
def test_missing_extra_and_bad_fields_are_422(client, body, where):
    assert where in assert_error(client.post("/fill_blank", json=body), 422, "validation_error")


def test_json_reply_fills_the_span_and_keeps_the_rest(client, fim_server):
    r = client.post("/fill_blank", json={"prompt": PROMPT, **SEEDED})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"blanks", "text", "finish_reason", "usage"}
    [blank] = body["blanks"]
    assert blank["index"] == 0 and blank["position"] == PROMPT.find("<span>") == len(PREFIX)
    assert body["text"] == PREFIX + blank["text"] + SUFFIX
    assert body["finish_reason"] in ("stop", "length", "eos")
    assert 1 <= body["usage"]["completion_tokens"] <= SEEDED["max_tokens"]
    engine = fim_server.loop.engine
    fill = FillRequest(fill_format(engine.config, engine.tokenizer), engine.tokenizer, PROMPT)
    assert body["usage"]["prompt_tokens"] == len(fill.prompt_ids)


def test_a_completion_with_a_suffix_is_the_fill_of_the_middle(client):
    """OpenAI's `suffix`: the same input, seed and middle as /fill_blank's, whatever the two texts hold."""
    filled = client.post("/fill_blank", json={"prompt": PROMPT, **SEEDED}).json()
    done = client.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, **SEEDED}).json()
    assert done["choices"][0]["text"] == filled["blanks"][0]["text"]
    assert done["usage"]["prompt_tokens"] == filled["usage"]["prompt_tokens"]
    code = client.post("/v1/completions", json={"prompt": "<span>", "suffix": "</span>", **SEEDED})
    assert code.status_code == 200  # markup in either text is text, not a blank
    assert_error(client.post("/v1/completions", json={"prompt": PREFIX, "suffix": SUFFIX, "echo": True}), 422,
                 "validation_error")


def test_sse_sends_the_blank_then_the_result_then_done(client):
    events = sse_events(client, "/fill_blank", {"prompt": PROMPT, **SEEDED, "stream": True})
    assert [e.event for e in events] == ["message"] * len(events) and events[-1].data == "[DONE]"
    blank, final = (json.loads(e.data) for e in events[:-1])
    assert set(blank) == {"index", "position", "text"} and blank["position"] == len(PREFIX)
    assert set(final) == {"blanks", "text", "finish_reason", "usage"}
    assert final["blanks"] == [blank] and final["text"] == PREFIX + blank["text"] + SUFFIX
    plain = client.post("/fill_blank", json={"prompt": PROMPT, **SEEDED}).json()  # the same seed, the same fill
    assert plain == final


def test_a_stream_that_times_out_ends_with_an_error_event(fim_llama_dir):
    with running_server(fim_llama_dir, load=slow_loader(0.05), request_timeout=0.2) as srv, srv.client() as c:
        events = sse_events(c, "/fill_blank", {"prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True})
        assert events[-1].event == "error" and json.loads(events[-1].data)["error"]["type"] == "timeout"
        assert len(events) == 1  # one blank: nothing is complete before the end


def test_a_client_that_hangs_up_cancels_the_fill(fim_llama_dir):
    # Greedy, so no sampled end token can finish the fill before the client hangs up.
    body = {"prompt": PROMPT, "max_tokens": 100, "temperature": 0}
    with running_server(fim_llama_dir, load=slow_loader(0.05)) as srv:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/fill_blank", json=body, timeout=0.3)
        deadline = time.monotonic() + 1.0  # the whole fill would take 100 × 50 ms
        while srv.metric("vramlite_requests_running") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.metric("vramlite_requests_running") == 0
        assert srv.metric("vramlite_generation_tokens_total") < 60
        assert srv.metric("vramlite_requests_total", route="/fill_blank", status="499") == 1


def test_demo_llama_has_no_fim_tokens_so_fill_blank_is_400():
    with running_server(demo_models.path()) as srv, srv.client() as c:
        r = c.post("/fill_blank", json={"prompt": "今天<span>，我们<span>。"})
        message = assert_error(r, 400, "unsupported_task")
        assert "(llama)" in message and "decoder-only" in message
