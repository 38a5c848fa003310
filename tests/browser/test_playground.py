"""The web playground at `/` in Chromium against a live daemon: streaming, Stop, 429 retry, fill_blank, the
engine panel and its live charts, and the layout at desktop and phone widths (screenshots in `artifacts`)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.conftest import Running, running_server
from vramlite import models as demo_models

pytestmark = pytest.mark.browser

PHONE = {"width": 375, "height": 812}
PROMPT = "The quick brown fox"


def generated(page: Any) -> str:
    return page.locator("#generated").text_content() or ""


def wait_longer(page: Any, selector: str, than: int) -> int:
    """Waits until `selector`'s text is longer than `than` characters; returns its length."""
    page.wait_for_function("([sel, n]) => (document.querySelector(sel)?.textContent ?? '').length > n",
                           arg=[selector, than])
    return len(page.locator(selector).text_content() or "")


def wait_status(page: Any, prefix: str) -> None:
    page.wait_for_function("p => document.getElementById('status').textContent.startsWith(p)", arg=prefix)


def set_knobs(page: Any, **values: Any) -> None:
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def assert_ready(page: Any) -> None:
    assert page.locator("#send").is_enabled() and page.locator("#stop-button").is_disabled()
    assert page.locator("#request").get_attribute("aria-busy") == "false"


def running_requests(daemon: Running) -> float:
    return daemon.metric("vramlite_requests_running")


def test_page_is_public_with_a_strict_csp(daemon: Running):
    r = httpx.get(daemon.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(daemon.url + "/static/app.js").status_code == 200
    assert httpx.get(daemon.url + "/static/nope.js").json()["error"]["type"] == "not_found"
    stats = httpx.get(daemon.url + "/stats").json()
    assert stats["state"] == "ready" and "generation_tokens_total" in stats["metrics"]


def test_engine_panel_shows_the_plan_and_live_charts(page: Any, daemon: Running, artifacts: Path):
    plan = httpx.get(daemon.url + "/info").json()["offload"]
    resident, streamed = len(plan["resident_layers"]), len(plan["streamed_layers"])
    assert resident and streamed and resident + streamed == 6
    page.wait_for_selector("#plan-bar .layer")
    assert page.locator("#plan-bar .layer.resident").count() == resident
    assert page.locator("#plan-bar .layer.streamed").count() == streamed
    assert f"{resident} resident in VRAM, {streamed} streamed" in page.locator("#plan-bar").get_attribute("aria-label")
    assert "29.0 MiB" in page.locator("#plan-bytes").text_content()
    facts = page.locator("#facts").text_content()
    assert "demo-llama" in facts and "llama" in facts and "cpu" in facts and "float32" in facts
    assert page.locator("#server-state").text_content() == "ready"
    for chart in ("pcie", "vram", "tokens", "queue"):
        before = int(page.locator(f"#chart-{chart}").get_attribute("data-samples"))
        page.wait_for_function("([id, n]) => Number(document.getElementById(id).dataset.samples) > n",
                               arg=[f"chart-{chart}", before])
    page.screenshot(path=artifacts / "engine-desktop.png", full_page=True)


def test_generate_streams_then_matches_the_json_reply(page: Any, daemon: Running, artifacts: Path):
    page.fill("#prompt", PROMPT)
    set_knobs(page, temperature=0, max_tokens=40)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    first = wait_longer(page, "#generated", 0)
    second = wait_longer(page, "#generated", first)
    assert second > first > 0
    wait_status(page, "Done")
    assert_ready(page)
    reply = httpx.post(daemon.url + "/generate", json={"prompt": PROMPT, "temperature": 0, "max_tokens": 40},
                       timeout=30).json()
    assert generated(page) == reply["text"]
    assert f"{reply['usage']['completion_tokens']} generated tokens" in page.locator("#meter").text_content()
    # The tokens/s and PCIe charts drew the generation (streamed layers are copied each step): some point of
    # each sits above its baseline (y = 100).
    for chart in ("tokens", "pcie"):
        page.wait_for_function("""id => document.querySelector(`#${id} polyline`).getAttribute('points')
                                          .split(' ').some(p => Number(p.split(',')[1]) < 100)""", arg=f"chart-{chart}")
    page.screenshot(path=artifacts / "generate-desktop.png", full_page=True)


def test_min_p_and_min_tokens_knobs_go_with_the_request(page: Any, daemon: Running):
    """The same knobs in a JSON request give the same text: min_p = 1 makes a hot, seeded draw greedy."""
    knobs = {"temperature": 5, "seed": 3, "min_p": 1, "max_tokens": 12, "min_tokens": 12}
    page.fill("#prompt", PROMPT)
    set_knobs(page, **knobs)
    page.click("#send")
    wait_status(page, "Done")
    reply = httpx.post(daemon.url + "/generate", json={"prompt": PROMPT, **knobs}, timeout=30).json()
    greedy = httpx.post(daemon.url + "/generate", json={"prompt": PROMPT, **knobs, "temperature": 0}, timeout=30)
    assert generated(page) == reply["text"] == greedy.json()["text"]
    assert reply["usage"]["completion_tokens"] == 12


def test_token_probabilities_shade_each_token_and_name_its_alternatives(page: Any, daemon: Running,
                                                                        artifacts: Path):
    page.fill("#prompt", PROMPT)
    set_knobs(page, temperature=0, max_tokens=12)
    page.check("#show-probs")
    page.click("#send")
    wait_status(page, "Done")
    reply = httpx.post(daemon.url + "/generate", json={"prompt": PROMPT, "temperature": 0, "max_tokens": 12,
                                                       "logprobs": 5}, timeout=30).json()
    tokens = page.locator("#generated .tok")
    assert tokens.count() == len(reply["logprobs"]) and generated(page) == reply["text"]
    first = reply["logprobs"][0]
    title = tokens.first.get_attribute("title")
    assert title.splitlines()[0] == f"{100 * math.exp(first['logprob']):.1f}%" and len(title.splitlines()) == 6
    assert json.dumps(first["top"][0]["text"], ensure_ascii=False) in title.splitlines()[1]
    page.screenshot(path=artifacts / "token-probabilities.png")
    page.uncheck("#show-probs")


def test_output_held_to_a_json_schema_and_a_bad_schema_shown(page: Any, daemon: Running, artifacts: Path):
    schema = {"type": "object", "properties": {"poem": {"type": "string", "maxLength": 12}}, "required": ["poem"]}
    page.fill("#prompt", PROMPT)
    set_knobs(page, temperature=0, max_tokens=40)
    page.fill("#json_schema", json.dumps(schema))
    page.click("#send")
    wait_status(page, "Done")
    assert list(json.loads(generated(page))) == ["poem"]
    page.screenshot(path=artifacts / "json-schema.png")
    page.fill("#json_schema", "{not json")
    page.click("#send")
    wait_status(page, "Failed")
    assert "the JSON schema is not JSON" in page.locator("#error").text_content()
    page.fill("#json_schema", "")
    page.fill("#regex", "(unclosed")
    page.click("#send")
    wait_status(page, "Failed")
    assert "output pattern" in page.locator("#error").text_content()
    page.fill("#regex", "")


def test_stop_cancels_the_request(page: Any, daemon: Running):
    page.fill("#prompt", PROMPT)
    set_knobs(page, max_tokens=100, seed=1)
    page.click("#send")
    wait_longer(page, "#generated", 0)
    assert page.locator("#stop-button").is_enabled()
    page.click("#stop-button")
    wait_status(page, "Stopped.")
    assert_ready(page)
    stopped_at = len(generated(page))
    deadline = time.monotonic() + 5
    while running_requests(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert running_requests(daemon) == 0, "the server kept generating after Stop"
    time.sleep(0.3)
    assert len(generated(page)) == stopped_at
    assert page.locator("#error").is_hidden()


def test_error_after_the_stream_began_is_shown(page: Any):
    """An `event: error` mid-stream (here the contract's 504, replayed by the browser) keeps the text so far."""
    error = {"error": {"type": "timeout", "message": "the request took longer than request_timeout=1 s"}}
    body = (f"data: {json.dumps({'index': 0, 'token': {'id': 7, 'text': ' jumps'}})}\n\n"
            f"event: error\ndata: {json.dumps(error)}\n\n")
    page.route("**/generate", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    page.click("#send")
    page.locator("#error").wait_for(state="visible")
    assert page.locator("#error strong").text_content() == "Error · timeout"
    assert error["error"]["message"] in page.locator("#error").text_content()
    assert generated(page) == " jumps"
    assert_ready(page)


def test_busy_server_is_retried_after_retry_after(page: Any, daemon: Running):
    """One batch slot, no queue: while another client generates, the page says it is busy, then retries."""
    other = threading.Thread(target=httpx.post, args=(daemon.url + "/generate",),
                             kwargs={"json": {"prompt": PROMPT, "max_tokens": 60, "min_tokens": 60},  # no early EOS
                                     "timeout": 30})
    other.start()
    try:
        deadline = time.monotonic() + 5
        while not running_requests(daemon) and time.monotonic() < deadline:
            time.sleep(0.02)
        page.fill("#prompt", PROMPT)
        set_knobs(page, max_tokens=5)
        page.click("#send")
        wait_status(page, "Server busy, retrying in")
        wait_status(page, "Done")
    finally:
        other.join()
    assert page.locator("#error").is_hidden()
    assert generated(page)


def fill_two_blanks(page: Any) -> None:
    """Types a two-blank text with the Insert blank button, then sends it with Ctrl+Enter."""
    page.focus("#tab-generate")  # the tabs switch with the arrow keys
    page.keyboard.press("ArrowRight")
    assert page.locator("#tab-fill").get_attribute("aria-selected") == "true"
    assert page.locator("#send").text_content() == "Fill blanks"
    page.fill("#fill-prompt", "")
    page.type("#fill-prompt", "今天")
    page.click("#insert-blank")
    page.keyboard.type("，我们")
    page.click("#insert-blank")
    page.keyboard.type("。")
    assert page.input_value("#fill-prompt") == "今天<span>，我们<span>。"
    assert page.locator("#blank-count").text_content() == "2 blanks"
    page.keyboard.press("Control+Enter")


def test_fill_blank_shows_the_servers_error(page: Any, daemon: Running, artifacts: Path):
    """The demo LLaMA cannot fill blanks: the page shows the server's 400 unsupported_task and its message."""
    message = httpx.post(daemon.url + "/fill_blank", json={"prompt": "a<span>b"}).json()["error"]["message"]
    fill_two_blanks(page)
    error = page.locator("#error")
    error.wait_for(state="visible")
    assert "Error 400" in error.text_content() and "unsupported_task" in error.text_content()
    assert message in error.text_content()
    assert page.locator("#status").text_content() == "Failed."
    assert_ready(page)
    page.screenshot(path=artifacts / "fill-error-desktop.png", full_page=True)
    page.set_viewport_size(PHONE)
    page.screenshot(path=artifacts / "fill-error-phone.png", full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "the page scrolls sideways"


def test_fill_blank_stream_fills_each_blank_in_place(page: Any, artifacts: Path):
    """The page against the contract's fill_blank stream (DESIGN.md), replayed by the browser since the demo
    daemon cannot fill: a completed-blank event per blank, the final reply, then [DONE]."""
    events = [{"index": 1, "position": 9, "text": "一起去公园"}, {"index": 0, "position": 2, "text": "天气很好"},
              {"blanks": [{"index": 0, "position": 2, "text": "天气很好"}, {"index": 1, "position": 9,
                                                                        "text": "一起去公园"}],
               "text": "今天天气很好，我们一起去公园。"}]
    body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\n\n" for e in events) + "data: [DONE]\n\n"
    page.route("**/fill_blank", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                            body=body))
    fill_two_blanks(page)
    wait_status(page, "Done: 2 blanks filled")
    filled = page.locator("#output mark.blank.filled")
    assert filled.all_text_contents() == ["天气很好", "一起去公园"]
    assert page.locator("#output").text_content() == "今天天气很好，我们一起去公园。"
    page.screenshot(path=artifacts / "fill-stream-desktop.png", full_page=True)


def test_fill_blank_fills_each_blank_in_place(page: Any, fill_daemon: Running, artifacts: Path):
    page.goto(fill_daemon.url + "/")
    page.wait_for_function("() => document.getElementById('facts').textContent.includes('fill model')")
    fill = httpx.get(fill_daemon.url + "/info").json()["fill_model"]
    assert f"{fill['name']} (t5, ready, " in page.locator("#facts").text_content()
    fill_two_blanks(page)
    wait_status(page, "Done")
    assert page.locator("#error").is_hidden()
    marks = page.locator("#output mark.blank")
    assert marks.count() == 2
    assert page.locator("#output mark.blank.filled").count() == 2
    text = page.locator("#output").text_content()
    assert text.startswith("今天") and "，我们" in text and text.endswith("。")
    page.screenshot(path=artifacts / "fill-desktop.png", full_page=True)


def test_phone_width_layout(browser: Any, daemon: Running, artifacts: Path):
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(daemon.url + "/")
        page.wait_for_selector("#plan-bar .layer")
        page.wait_for_function("() => Number(document.getElementById('chart-queue').dataset.samples) > 1")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "the page scrolls sideways"
        engine = page.locator(".engine").bounding_box()
        work = page.locator(".work").bounding_box()
        assert engine["y"] >= work["y"] + work["height"], "one column on a phone: the engine panel comes second"
        page.screenshot(path=artifacts / "phone.png", full_page=True)
    finally:
        context.close()


def test_api_key_is_sent_from_session_storage(browser: Any, artifacts: Path):
    """With --api-key the page itself loads, the panel says a key is needed, and works once one is typed."""
    with running_server(demo_models.path(), api_key="sk-ui") as daemon:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        try:
            page.goto(daemon.url + "/")
            page.locator("#engine-error").wait_for(state="visible")
            assert "API key" in page.locator("#engine-error").text_content()
            assert page.locator("#server-state").text_content() == "API key needed"
            page.fill("#api-key", "sk-ui")
            page.keyboard.press("Tab")  # change event
            page.wait_for_selector("#plan-bar .layer")
            assert page.locator("#engine-error").is_hidden()
            assert page.evaluate("sessionStorage.getItem('vramlite.apiKey')") == "sk-ui"
            page.fill("#prompt", PROMPT)
            set_knobs(page, max_tokens=3)
            page.click("#send")
            wait_status(page, "Done")
            page.screenshot(path=artifacts / "api-key-desktop.png", full_page=True)
        finally:
            context.close()
