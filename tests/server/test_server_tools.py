"""Tool calling on /v1/chat/completions, through the official client: the tools reach the chat template, a
forced choice holds the reply to calls, and "auto" reads calls from what the model wrote."""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import save_tiny_llama
from tests.server.conftest import running_server
from vramlite.server.tools import CallWatcher, ToolCall, read_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "celsius": {"type": "boolean"}},
                   "required": ["city", "celsius"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def oai(long_chat_server):
    return openai.OpenAI(base_url=long_chat_server.url + "/v1", api_key="none", max_retries=0)


def test_a_named_tool_choice_returns_a_call_with_arguments_of_its_schema(oai):
    done = oai.chat.completions.create(model="model", messages=ASK, tools=[WEATHER, TIME], max_tokens=64,
                                       temperature=1.0, seed=3,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "celsius"} and isinstance(arguments["celsius"], bool)


@pytest.mark.parametrize("stream", [False, True])
def test_required_returns_calls_of_the_tools(oai, stream):
    kwargs = dict(model="model", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=96,
                  temperature=0.8, seed=1)
    if stream:
        chunks = list(oai.chat.completions.create(**kwargs, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        calls = [c.function for chunk in chunks for c in chunk.choices[0].delta.tool_calls or ()]
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = oai.chat.completions.create(**kwargs).choices[0]
        calls, finish = [c.function for c in choice.message.tool_calls], choice.finish_reason
    assert finish == "tool_calls" and calls
    for call in calls:
        arguments = json.loads(call.arguments)
        assert call.name in ("get_weather", "get_time")
        assert set(arguments) == ({"city", "celsius"} if call.name == "get_weather" else {"zone"})


def test_auto_and_a_conversation_with_calls_and_results(oai):
    """A random model writes no calls: the reply is text. The history's call and result reach the template."""
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Paris", "celsius": true}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    done = oai.chat.completions.create(model="model", messages=messages, tools=[WEATHER], max_tokens=8,
                                       temperature=0)
    choice = done.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 40  # tools, call and result in the prompt


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(tool_choice="required"), "tool_choice needs tools"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}), "not among the tools"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
     "response_format cannot be combined"),
])
def test_bad_tool_requests_are_refused(oai, kwargs, message):
    with pytest.raises(openai.UnprocessableEntityError, match=message):
        oai.chat.completions.create(model="model", messages=ASK, max_tokens=2, **kwargs)


def test_tools_need_a_chat_template(tiny_llama_dir):
    with running_server(tiny_llama_dir) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="chat template"):
            client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK, tools=[WEATHER],
                                           max_tokens=2)


TOOLS = [WEATHER["function"], TIME["function"]]
TOOLS = [{"type": "function", "function": f} for f in TOOLS]


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "celsius": true}}\n'
     '</tool_call>', "Let me look.", [ToolCall("get_weather", '{"city": "Oslo", "celsius": true}')]),
    ('<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>\n<tool_call>{"name": "get_weat'
     'her", "arguments": "{}"}</tool_call>', None, [ToolCall("get_time", '{"zone": "UTC"}'),
                                                    ToolCall("get_weather", "{}")]),
    ('{"name": "get_time", "parameters": {"zone": "CET"}}', None, [ToolCall("get_time", '{"zone": "CET"}')]),
    ('[{"name": "get_time", "parameters": {}}]', None, [ToolCall("get_time", "{}")]),
    ('{"name": "launch", "arguments": {}}', '{"name": "launch", "arguments": {}}', []),  # not a tool of these
    ("<tool_call>{not json</tool_call> plain", "<tool_call>{not json</tool_call> plain", []),
    ("The weather is fine.", "The weather is fine.", []),
])
def test_auto_reads_hermes_blocks_and_json_calls(text, content, calls):
    assert read_calls(text, TOOLS, "auto") == (content, calls)
    assert read_calls(text, TOOLS, "none") == (text, [])


@pytest.mark.parametrize(("text", "content", "calls"), [
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "UTC"}}, {"name": "get_weather", "arguments": {}}]',
     None, [ToolCall("get_time", '{"zone": "UTC"}'), ToolCall("get_weather", "{}")]),  # v0.3, Nemo
    ('Sure.[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}', "Sure.",
     [ToolCall("get_time", '{"zone": "CET"}'), ToolCall("get_weather", '{"city": "Oslo"}')]),  # Small 3.2, Devstral
    ('[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{"zone": "UTC"}', None, [ToolCall("get_time", '{"zone": "UTC"}')]),
    ('[TOOL_CALLS]launch[ARGS]{}', "[TOOL_CALLS]launch[ARGS]{}", []),  # not a tool of these
    ('[TOOL_CALLS]get_time[ARGS]{"zone": ', '[TOOL_CALLS]get_time[ARGS]{"zone": ', []),  # cut short
])
def test_auto_reads_mistrals_tool_calls_with_ids_its_templates_take(text, content, calls):
    got_content, got = read_calls(text, TOOLS, "auto")
    assert (got_content, got) == (content, calls)
    ids = [call.to_openai()["id"] for call in got]
    assert all(len(i) == 9 and i.isalnum() for i in ids) and len(set(ids)) == len(ids)
    assert "[CALL_ID]" not in text or ids == ["a1B2c3D4e"]


@pytest.fixture(scope="module")
def mistral_like_dir(tmp_path_factory, spm_tokenizer_dir, chat_llama_dir):
    """A tiny LLaMA whose tokenizer has Mistral's [TOOL_CALLS] and [ARGS] special tokens (ids 512, 513)."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "[ARGS]"]})
    tokenizer.chat_template = json.loads((chat_llama_dir / "tokenizer_config.json").read_text())["chat_template"]
    tokenizer_dir = tmp_path_factory.mktemp("mistral-tokenizer")
    tokenizer.save_pretrained(tokenizer_dir)
    return save_tiny_llama(tmp_path_factory.mktemp("mistral-like") / "model", tokenizer_dir, vocab_size=514,
                           max_position_embeddings=1024)


def test_a_mistral_reply_keeps_its_tool_call_token_where_tools_are_read(mistral_like_dir):
    """Special tokens bring out no text, but a reply read for calls keeps [TOOL_CALLS], where they begin."""
    with running_server(mistral_like_dir, context=1024) as running:
        oai = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
        kwargs = dict(model="model", messages=ASK, max_tokens=1, temperature=0, logit_bias={"512": 100})
        assert oai.chat.completions.create(**kwargs, tools=[WEATHER]).choices[0].message.content == "[TOOL_CALLS]"
        assert oai.chat.completions.create(**kwargs).choices[0].message.content == ""
        shown = oai.completions.create(model="model", prompt="Hi", max_tokens=1, logit_bias={"512": 100},
                                       extra_body={"skip_special_tokens": False})
        assert shown.choices[0].text == "[TOOL_CALLS]"


def test_a_streamed_mistral_reply_is_held_from_its_tag():
    sent, rest, calls = watch(["Sure. [TOOL", "_CALLS]get_time[ARGS]", '{"zone": "UTC"}'])
    assert sent == ["Sure. ", "", ""] and (rest, calls) == ("", [ToolCall("get_time", '{"zone": "UTC"}')])


def watch(pieces: list[str]) -> tuple[list[str], str, list[ToolCall]]:
    watcher = CallWatcher()
    sent = [watcher.feed(piece) for piece in pieces]
    rest, calls = watcher.finish(TOOLS)
    return sent, rest, calls


def test_a_streamed_auto_reply_goes_out_until_a_call_may_begin():
    sent, rest, calls = watch(["Let me ", "look. <to", "ol_call>", '{"name": "get_time", "arguments": {"zone": ',
                               '"UTC"}}</tool_call>'])
    assert sent == ["Let me ", "look. ", "", "", ""]  # "<to" held back: the tag may begin there
    assert (rest, calls) == ("", [ToolCall("get_time", '{"zone": "UTC"}')])
    sent, rest, calls = watch(["A <b>", "old</b> move", " <tool"])  # other tags go out; a tag's start waits
    assert sent == ["A <b>", "old</b> move", " "] and (rest, calls) == ("<tool", [])
    sent, rest, calls = watch(["  ", '{"name": "get_time", ', '"parameters": {}}'])  # a JSON call opens the reply
    assert sent == ["", "", ""] and (rest, calls) == ("", [ToolCall("get_time", "{}")])
    sent, rest, calls = watch(['{"weather": ', '"fine"}'])  # JSON, but no call: it all comes at the end
    assert sent == ["", ""] and rest == '{"weather": "fine"}' and not calls


def test_auto_streams_plain_text_as_it_comes(oai):
    kwargs = dict(model="model", messages=ASK, tools=[WEATHER], max_tokens=24, temperature=0)
    whole = oai.chat.completions.create(**kwargs).choices[0]
    chunks = list(oai.chat.completions.create(**kwargs, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
