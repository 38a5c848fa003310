"""Fuzzing every route from the app's own OpenAPI schema (schemathesis) against a real uvicorn.

Each generated request, valid or not, must get a documented status with the contract's body (the error
responses carry `ErrorBody` in the schema, so schemathesis checks the body of every error), never a 500,
within `CALL_TIMEOUT_S`; an SSE reply must end by itself with its API's last event or an `event: error`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import settings
from schemathesis.core.transport import Response
from schemathesis.generation.case import Case
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.server.conftest import Running, running_server
from vramlite.server.app import create_app
from vramlite.server.schemas import MAX_MODEL_NAME_CHARS, MAX_TOKENS_BOUND
from vramlite.server.settings import Settings

API_KEY = "sk-fuzz"
SERVED_MODEL = "fuzz-model"
CALL_TIMEOUT_S = 10
FUZZ_CONTEXT = 32  # bounds every generation, prompt included, to a few tokens
STREAM_MAX_TOKENS = 8  # schemathesis reads at most 20 events of a stream; ours must end within them

# The schema does not depend on the model; the server under test builds the same one.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    """Steer generated bodies past what the schema cannot know, swapping valid values for valid values only
    (so a negative case stays negative): OpenAI bodies name the served model, and a body with a `stream`
    flag streams, asking for at most `STREAM_MAX_TOKENS` tokens. Hooks apply in the fuzzing phase only; the
    coverage phase sends its bodies as generated, mostly without `stream`, so it covers the JSON replies."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if isinstance(body.get("model"), str) and len(body["model"]) <= MAX_MODEL_NAME_CHARS:
        body["model"] = SERVED_MODEL
    if not isinstance(body.get("stream"), bool):
        return body
    body["stream"] = True
    field = "max_output_tokens" if "max_output_tokens" in body else "max_tokens"  # the Responses API's name
    max_tokens = body.get(field)
    if max_tokens is None:
        body[field] = STREAM_MAX_TOKENS
    elif type(max_tokens) is int and 0 <= max_tokens <= MAX_TOKENS_BOUND:
        body[field] = min(max_tokens, STREAM_MAX_TOKENS)
    return body


@pytest.fixture(scope="module")
def fuzz_server(chat_llama_dir: Path) -> Iterator[Running]:
    """The tiny LLaMA with a chat template, behind an API key."""
    with running_server(chat_llama_dir, context=FUZZ_CONTEXT, request_timeout=CALL_TIMEOUT_S / 2, api_key=API_KEY,
                        served_model_name=SERVED_MODEL) as running:
        yield running


STREAM_ENDS = ("data: [DONE]", "event: response.completed", "event: response.incomplete", "event: message_stop")


def stream_ends(ctx: schemathesis.CheckContext, response: Response, case: Case) -> None:
    """An SSE reply ends by itself: on its API's last event (`data: [DONE]`; the Responses API's
    `response.completed` or `.incomplete`; Anthropic's `message_stop`), or on one `event: error` with a type
    and a message (the contract's body; the Responses API's and Anthropic's error events)."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return
    assert not response.stream_cut_short, "the event stream did not end within the timeout"
    events = response.text.strip().split("\n\n")
    if events[-1].startswith(STREAM_ENDS):
        return
    kind, _, data = events[-1].partition("\n")
    assert kind == "event: error", f"the stream ends with {events[-1]!r}"
    error = json.loads(data.removeprefix("data: "))
    error = error.get("error", error)
    assert isinstance(error.get("message"), str) and isinstance(error.get("type", error.get("code")), str)


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True)
def test_fuzz_routes(case: Case, fuzz_server: Running) -> None:
    # positive_data_acceptance is left out: a schema-valid body can still be refused for what only the
    # served model knows (max_tokens over its context, a prompt too long, another model's name, no <span>).
    case.call_and_validate(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {API_KEY}"},
                           timeout=CALL_TIMEOUT_S, additional_checks=[stream_ends],
                           excluded_checks=[positive_data_acceptance])
