"""POST /v1/messages and /v1/messages/count_tokens, through Anthropic's client: the system prompt, messages and
their blocks reach the chat template as the chat route's messages would, the reply comes as text and tool_use
blocks or as the stream of events that builds them, and stop reasons say why it ended."""

from __future__ import annotations

import json

import anthropic
import pytest

from vramlite.server.anthropic_messages import MessagesRequest, MessageWriter
from vramlite.server.errors import ApiError
from vramlite.server.schemas import ChatCompletionRequest

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                            "required": ["city"]}}
CHAT_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER["input_schema"],
                                                 "description": WEATHER["description"]}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me look."},
                                      {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                       "input": {"city": "Paris"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                  "content": [{"type": "text", "text": '{"temperature": 21}'}]},
                                 {"type": "text", "text": "And Rome?"}]},
]
CHAT_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "Let me look.", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": '{"temperature": 21}'},
    {"role": "user", "content": "And Rome?"},
]


@pytest.fixture(scope="module")
def claude(long_chat_server):
    return anthropic.Anthropic(base_url=long_chat_server.url, api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def oai(long_chat_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=long_chat_server.url + "/v1", api_key="none", max_retries=0)


def test_blocks_become_the_chat_routes_messages():
    body = MessagesRequest.model_validate({"model": "model", "max_tokens": 5, "system": "Be brief.",
                                           "messages": CONVERSATION, "tools": [WEATHER],
                                           "tool_choice": {"type": "any"}, "stop_sequences": ["\n\n"]})
    chat = body.chat_request()
    assert chat["messages"] == CHAT_MESSAGES and chat["tools"] == [CHAT_WEATHER]
    assert (chat["max_tokens"], chat["stop"], chat["tool_choice"]) == (5, ["\n\n"], "required")
    assert ChatCompletionRequest.model_validate(chat).tool_mode() == "required"


def test_a_text_reply_is_the_chat_routes_and_its_stream_builds_it(claude, oai):
    kwargs = dict(model="model", system="Be brief.", messages=CONVERSATION, tools=[WEATHER], max_tokens=12,
                  extra_body={"temperature": 0})  # the client no longer takes temperature; the API still does
    done = claude.messages.create(**kwargs)
    chat = oai.chat.completions.create(model="model", messages=CHAT_MESSAGES, tools=[CHAT_WEATHER], max_tokens=12,
                                       temperature=0)
    (block,) = done.content
    assert block.type == "text" and block.text == chat.choices[0].message.content
    assert done.id.startswith("msg_") and done.role == "assistant" and done.model == "model"
    assert (done.stop_reason, done.stop_sequence) == ("max_tokens", None)
    assert (done.usage.input_tokens, done.usage.cache_read_input_tokens) == (chat.usage.prompt_tokens, 0)
    assert chat.usage.prompt_tokens > 40 and chat.usage.prompt_tokens_details.cached_tokens > 40  # the same prompt
    assert done.usage.output_tokens == chat.usage.completion_tokens == 12
    assert claude.messages.count_tokens(model="model", system="Be brief.", messages=CONVERSATION,
                                        tools=[WEATHER]).input_tokens == chat.usage.prompt_tokens

    with claude.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events if e.type not in ("text", "input_json")]  # the client adds these two
    assert kinds[:2] == ["message_start", "content_block_start"] and kinds[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert len(deltas) > 1 and "".join(deltas) == block.text
    assert final.content[0].text == block.text and final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 12
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert final.usage.cache_read_input_tokens > 40  # cached, and so counted apart, as Anthropic counts them


def test_a_stop_sequence_is_named(claude):
    free = claude.messages.create(model="model", messages=CONVERSATION, max_tokens=24, extra_body={"temperature": 0})
    text = free.content[0].text
    stop = text[6:9]
    done = claude.messages.create(model="model", messages=CONVERSATION, max_tokens=24, stop_sequences=["zzz", stop],
                                  extra_body={"temperature": 0})
    assert (done.stop_reason, done.stop_sequence) == ("stop_sequence", stop)
    assert done.content[0].text == text[: text.index(stop)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_gives_a_tool_use_block(claude, stream):
    kwargs = dict(model="model", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
                  max_tokens=48, tool_choice={"type": "tool", "name": "get_weather"},
                  extra_body={"temperature": 1.0, "seed": 3})
    if stream:
        with claude.messages.stream(**kwargs) as s:
            done = s.get_final_message()
    else:
        done = claude.messages.create(**kwargs)
    (call,) = done.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    assert set(call.input) == {"city"} and isinstance(call.input["city"], str)
    assert done.stop_reason == "tool_use"


def test_output_config_holds_the_output_to_a_schema(claude):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
              "additionalProperties": False}
    done = claude.messages.create(model="model", messages=[{"role": "user", "content": "Which city?"}],
                                  max_tokens=24, output_config={"format": {"type": "json_schema", "schema": schema},
                                                                "effort": "low"},
                                  extra_body={"temperature": 1.0, "seed": 1})
    assert json.loads(done.content[0].text)["city"] in ("Paris", "Rome")


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
     anthropic.UnprocessableEntityError, "messages.0"),
    (dict(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "x", "name": "f", "input": {}}]}]),
     anthropic.UnprocessableEntityError, "cannot have tool_use"),
    (dict(thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2048), anthropic.UnprocessableEntityError,
     "--reasoning-format think"),
    (dict(thinking={"type": "enabled"}), anthropic.UnprocessableEntityError, "needs budget_tokens"),
    (dict(thinking={"type": "enabled", "budget_tokens": 1024}), anthropic.UnprocessableEntityError,
     "greater than thinking.budget_tokens"),
    (dict(tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"}), anthropic.UnprocessableEntityError,
     "not among the tools"),
    (dict(tool_choice={"type": "auto", "name": "x"}), anthropic.UnprocessableEntityError, "name goes with"),
    (dict(model="other"), anthropic.NotFoundError, "not served"),
])
def test_what_a_text_server_cannot_do_is_refused(claude, kwargs, error, message):
    with pytest.raises(error, match=message) as refused:
        claude.messages.create(**{"model": "model", "max_tokens": 2,
                                  "messages": [{"role": "user", "content": "Hi"}], **kwargs})
    body = refused.value.body  # in Anthropic's shape, its type for the status
    assert body["type"] == "error" and message in body["error"]["message"]
    assert body["error"]["type"] == ("not_found_error" if error is anthropic.NotFoundError else "invalid_request_error")


def test_errors_of_every_origin_take_anthropics_shape_on_its_routes(long_chat_server):
    with long_chat_server.client() as c:
        for path, kwargs, status, kind in [
            ("/v1/messages", {"content": b"{not json"}, 422, "invalid_request_error"),  # FastAPI's validation
            ("/v1/messages/count_tokens", {"json": {"model": "model"}}, 422, "invalid_request_error"),
            ("/v1/messages", {"content": b"x" * (2 << 20)}, 413, "request_too_large"),  # the size guard
            ("/v1/messages/nowhere", {"json": {}}, 404, "not_found_error"),  # Starlette's routing
        ]:
            r = c.post(path, headers={"content-type": "application/json"}, **kwargs)
            assert (r.status_code, r.json()["type"], r.json()["error"]["type"]) == (status, "error", kind), path
        r = c.post("/v1/chat/completions", json={"model": "model"})  # elsewhere, our own
        assert r.status_code == 422 and set(r.json()) == {"error"} and r.json()["error"]["type"] == "validation_error"


def test_thinking_blocks_sent_back_are_the_assistants_thought():
    said = {"role": "assistant", "content": [{"type": "thinking", "thinking": "Paris, so.", "signature": ""},
                                             {"type": "redacted_thinking", "data": "x"},
                                             *CONVERSATION[1]["content"]]}
    body = MessagesRequest.model_validate({"model": "model", "max_tokens": 5,
                                           "messages": [CONVERSATION[0], said, CONVERSATION[2]]})
    assert body.chat_request()["messages"][1] == {**CHAT_MESSAGES[2], "reasoning_content": "Paris, so."}
    with pytest.raises(ValueError, match="a user's message cannot have thinking blocks"):
        MessagesRequest.model_validate({"model": "model", "max_tokens": 5, "messages": [
            {"role": "user", "content": [{"type": "thinking", "thinking": "hm"}]}]})


def test_a_last_assistant_message_is_a_prefill_the_reply_continues(claude, oai):
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "It is"}]
    done = claude.messages.create(model="model", messages=messages, max_tokens=6, extra_body={"temperature": 0})
    chat = oai.chat.completions.create(model="model", messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert done.content[0].text == chat.choices[0].message.content
    assert done.usage.input_tokens + done.usage.cache_read_input_tokens == chat.usage.prompt_tokens


def test_the_model_list_reads_as_anthropics(claude):
    (model,) = list(claude.models.list())
    assert (model.id, model.display_name, model.max_input_tokens) == ("model", "model", 1024)
    assert claude.models.retrieve("model").id == "model"


def test_thinking_sets_the_templates_enable_thinking():
    ask = {"model": "m", "max_tokens": 2048, "messages": [{"role": "user", "content": "Hi"}]}
    assert "chat_template_kwargs" not in MessagesRequest.model_validate(ask).chat_request()
    for thinking, enabled in ({"type": "disabled"}, False), ({"type": "enabled", "budget_tokens": 1024}, True):
        request = MessagesRequest.model_validate({**ask, "thinking": thinking})
        assert request.chat_request()["chat_template_kwargs"] == {"enable_thinking": enabled}
        assert ChatCompletionRequest.model_validate(request.chat_request()).chat_template_kwargs == {
            "enable_thinking": enabled}


def test_a_stream_that_fails_ends_with_anthropics_error_event():
    event = MessageWriter("msg_1", "model", 3).error(ApiError(500, "internal_error", "boom"))
    assert event["event"] == "error"
    assert json.loads(event["data"]) == {"type": "error", "error": {"type": "api_error", "message": "boom"}}
