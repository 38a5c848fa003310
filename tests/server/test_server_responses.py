"""POST /v1/responses, through the official client: the input items reach the chat template as the chat route's
messages would, the reply comes as output items (text, function calls) or as the stream of events that builds
them, and what a stateless server cannot do is refused."""

from __future__ import annotations

import json

import openai
import pytest

from vramlite.server.responses import ResponsesRequest
from vramlite.server.schemas import ChatCompletionRequest

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                          "required": ["city"]}}
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": '{"temperature": 21}'},
    {"role": "user", "content": [{"type": "input_text", "text": "And "}, {"type": "input_text", "text": "Rome?"}]},
]
CHAT_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "user", "content": "And Rome?"},
]


@pytest.fixture(scope="module")
def oai(long_chat_server):
    return openai.OpenAI(base_url=long_chat_server.url + "/v1", api_key="none", max_retries=0)


def test_input_items_become_the_chat_routes_messages():
    body = ResponsesRequest.model_validate({"input": CONVERSATION, "instructions": "Be brief.",
                                            "tools": [WEATHER], "max_output_tokens": 5, "top_k": 3})
    chat = body.chat_request()
    assert chat["messages"] == CHAT_MESSAGES
    assert chat["tools"] == [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]
    assert chat["max_tokens"] == 5 and chat["top_k"] == 3
    assert ChatCompletionRequest.model_validate(chat).tool_mode() == "auto"


def test_replayed_reasoning_items_go_back_as_the_next_assistant_messages_thought():
    thought = {"type": "reasoning", "id": "rs_1", "summary": [],
               "content": [{"type": "reasoning_text", "text": "Paris, "}, {"type": "reasoning_text", "text": "so."}]}
    said = {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
            "content": [{"type": "output_text", "text": "Looking.", "annotations": []}]}
    body = ResponsesRequest.model_validate({"input": [CONVERSATION[0], thought, said, *CONVERSATION[1:]]})
    messages = body.chat_request()["messages"]
    assert messages[1] == {"role": "assistant", "content": "Looking.", "reasoning_content": "Paris, so.",
                           "tool_calls": CHAT_MESSAGES[2]["tool_calls"]}  # the call joins the message it follows
    assert messages[2:] == CHAT_MESSAGES[3:]
    assert ChatCompletionRequest.model_validate(body.chat_request()).messages[1].reasoning_content == "Paris, so."


def test_a_text_reply_is_the_chat_routes_and_its_stream_builds_it(oai):
    kwargs = dict(model="model", instructions="Be brief.", input=CONVERSATION, tools=[WEATHER],
                  max_output_tokens=12, temperature=0)
    done = oai.responses.create(**kwargs)
    chat = oai.chat.completions.create(model="model", messages=CHAT_MESSAGES,
                                       tools=[{"type": "function", "function": {
                                           k: v for k, v in WEATHER.items() if k != "type"}}],
                                       max_tokens=12, temperature=0)
    assert done.object == "response" and done.id.startswith("resp_") and done.model == "model"
    assert done.output_text == chat.choices[0].message.content
    assert done.usage.input_tokens == chat.usage.prompt_tokens > 40  # the call and its output in the prompt
    assert done.usage.output_tokens == chat.usage.completion_tokens
    assert (done.status, done.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    (message,) = done.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"

    events = list(oai.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == done.output_text
    last = events[-1].response
    assert last.output_text == done.output_text
    assert (last.usage.input_tokens, last.usage.output_tokens) == (done.usage.input_tokens, done.usage.output_tokens)
    assert {e.item_id for e in events if e.type == "response.output_text.delta"} == {last.output[0].id}


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_gives_a_function_call_item(oai, stream):
    kwargs = dict(model="model", input="Weather in Paris?", tools=[WEATHER], max_output_tokens=48,
                  temperature=1.0, extra_body={"seed": 3}, tool_choice={"type": "function", "name": "get_weather"})
    if stream:
        events = list(oai.responses.create(**kwargs, stream=True))
        assert events[-1].type == "response.completed"
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        done = events[-1].response
        assert "".join(deltas) == done.output[0].arguments
    else:
        done = oai.responses.create(**kwargs)
    (call,) = done.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert set(json.loads(call.arguments)) == {"city"}
    assert done.status == "completed" and done.tool_choice.name == "get_weather"


def test_text_format_holds_the_output_to_a_schema(oai):
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
              "additionalProperties": False}
    done = oai.responses.create(model="model", input="Which city?", max_output_tokens=24, temperature=1.0,
                                extra_body={"seed": 1},
                                text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    assert json.loads(done.output_text)["city"] in ("Paris", "Rome")
    assert done.text.format.type == "json_schema"


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    (dict(previous_response_id="resp_1"), openai.UnprocessableEntityError, "not stored"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]),
     openai.UnprocessableEntityError, "input_text"),
    (dict(tools=[{"type": "web_search"}]), openai.UnprocessableEntityError, "tools.0"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "name": "nope"}), openai.UnprocessableEntityError,
     "not among the tools"),
    (dict(text={"format": {"type": "json_object", "schema": {}}}), openai.UnprocessableEntityError, "schema"),
    (dict(model="other"), openai.NotFoundError, "not served"),
])
def test_what_a_stateless_text_server_cannot_do_is_refused(oai, kwargs, error, message):
    with pytest.raises(error, match=message):
        oai.responses.create(**{"model": "model", "input": "Hi", "max_output_tokens": 2, **kwargs})


def test_an_input_over_the_context_is_refused_before_the_stream(long_chat_server):
    with long_chat_server.client() as c:
        r = c.post("/v1/responses", json={"input": "word " * 2000, "stream": True, "max_output_tokens": 4})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


@pytest.mark.parametrize("ask", [dict(top_logprobs=2), dict(include=["message.output_text.logprobs"])])
def test_logprobs_come_with_the_text_streamed_or_not(oai, ask):
    kwargs = dict(model="model", input="Hi", max_output_tokens=10, temperature=0, **ask)
    done = oai.responses.create(**kwargs)
    chat = oai.chat.completions.create(model="model", messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=ask.get("top_logprobs", 0))
    want = [t.model_dump() for t in chat.choices[0].logprobs.content]
    assert len(want) == 10 and all(len(t["top_logprobs"]) == ask.get("top_logprobs", 0) for t in want)
    events = list(oai.responses.create(**kwargs, stream=True))
    streamed = [t for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    for got in (done.output[0].content[0].logprobs, streamed, events[-1].response.output[0].content[0].logprobs):
        assert_same_logprobs([t.model_dump() for t in got], want)


def assert_same_logprobs(got: list[dict], want: list[dict]) -> None:
    """The same tokens, and log-probabilities up to rounding (a cached prompt prefix sums in another order)."""
    def tokens(entries: list[dict]) -> list:
        return [(t["token"], t["bytes"], [(u["token"], u["bytes"]) for u in t["top_logprobs"]]) for t in entries]

    def numbers(entries: list[dict]) -> list[float]:
        return [x for t in entries for x in (t["logprob"], *(u["logprob"] for u in t["top_logprobs"]))]

    assert tokens(got) == tokens(want) and numbers(got) == pytest.approx(numbers(want), abs=1e-4)
