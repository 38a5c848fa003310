"""OpenAI's Responses API (`POST /v1/responses`) over the chat route: a request's input items become chat
messages, and the reply, read for tool calls as chat reads it, becomes a response object or its stream of
events.

Stateless, as a request with `store: false` is at OpenAI: no response is kept, so `previous_response_id` is
refused and a conversation goes back whole in `input` (its `function_call` and `function_call_output` items
included; reasoning items go back as the thought of the assistant's message after them). Text in, text out:
image and file items, and tools other than functions, are refused.
"""

from __future__ import annotations

import itertools
import json
import secrets
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, ConfigDict, Field, Tag, model_validator

from vramlite.engine import FinishReason
from vramlite.server.errors import ApiError
from vramlite.server.schemas import (
    MAX_MODEL_NAME_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TOOL_NAME_CHARS,
    MAX_TOOLS,
    FunctionDefinition,
    LogprobsCount,
    MaxTokens,
    OpenAIBody,
    SamplingFields,
    StructuredFields,
    by_type,
    joined_text,
    unsupported,
)
from vramlite.server.tools import ToolCall

MAX_INPUT_ITEMS = 4096
LOGPROBS_INCLUSION = "message.output_text.logprobs"
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
CallId = Annotated[str, Field(min_length=1, max_length=256)]


class TextPart(OpenAIBody):
    type: Literal["input_text", "output_text"]
    text: Text


class MessageItem(OpenAIBody):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[TextPart]


class FunctionCallItem(OpenAIBody):
    """A call the model made earlier in the conversation."""

    type: Literal["function_call"]
    call_id: CallId
    name: str = Field(max_length=MAX_TOOL_NAME_CHARS)
    arguments: Text


class FunctionCallOutputItem(OpenAIBody):
    """What a call returned, for the model to read."""

    type: Literal["function_call_output"]
    call_id: CallId
    output: Text | list[TextPart]


class ReasoningText(OpenAIBody):
    type: Literal["reasoning_text"]
    text: Text


class ReasoningItem(OpenAIBody):
    """A thought the model wrote earlier (`reasoning_format` "think"), sent back as clients replay output items:
    it goes to the template with the assistant's message after it, as `reasoning_content`."""

    type: Literal["reasoning"]
    content: list[ReasoningText] | None = None


InputItem = Annotated[Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
                      | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
                      | Annotated[ReasoningItem, Tag("reasoning")], by_type("message")]


class FunctionTool(FunctionDefinition):
    """A function the model may call, as the Responses API gives it: flat, not under `function`."""

    type: Literal["function"]


class NamedFunctionChoice(OpenAIBody):
    type: Literal["function"]
    name: str = Field(max_length=MAX_TOOL_NAME_CHARS)


class TextFormat(OpenAIBody):
    """`text.format`: plain text, any JSON object, or JSON that `schema` accepts."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_for_its_type(self) -> TextFormat:
        if (self.schema_ is not None) != (self.type == "json_schema"):
            raise ValueError('schema goes with type "json_schema", and only with it')
        return self

    def response_format(self) -> dict[str, Any]:
        """The chat route's `response_format` of this format."""
        if self.type != "json_schema":
            return {"type": self.type}
        return {"type": "json_schema", "json_schema": {"name": self.name, "schema": self.schema_,
                                                       "strict": self.strict}}


class TextConfig(OpenAIBody):
    format: TextFormat | None = None


class ResponsesRequest(SamplingFields, StructuredFields):
    """`POST /v1/responses`: OpenAI's Responses API, stateless; the sampling fields of the other routes too."""

    model_config = ConfigDict(extra="ignore")
    until_context: ClassVar[bool] = True

    model: str | None = Field(None, max_length=MAX_MODEL_NAME_CHARS, description="must name the served model "
                              "when given")
    input: Text | Annotated[list[InputItem], Field(min_length=1, max_length=MAX_INPUT_ITEMS)] = Field(
        description="a user's text, or the conversation's items: messages, function calls and their outputs")
    instructions: Text | None = Field(None, description="a system message before the input")
    max_tokens: MaxTokens | None = Field(None, validation_alias=AliasChoices("max_output_tokens", "max_tokens"),
                                         description="tokens to generate at most (`max_output_tokens`)")
    stream: bool = False
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS, description="functions the model may "
                                             "call; the chat template describes them to it")
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = Field(
        None, description='as on the chat route: "auto" (the default with tools), "required", a named function '
        'or "none"')
    parallel_tool_calls: bool = True
    text: TextConfig | None = Field(None, description="`format`: structured output, `json_object` or "
                                    "`json_schema` with its `schema`")
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16,
                                                                              description="echoed back")
    user: str | None = Field(None, max_length=256)
    top_logprobs: LogprobsCount | None = Field(None, description="each output token's log-probability and this "
                                               "many most likely tokens' (on the output_text parts)")
    include: list[Annotated[str, Field(max_length=128)]] | None = Field(
        None, max_length=16, description='"message.output_text.logprobs": log-probabilities (as top_logprobs 0); '
        "other inclusions name items this server never writes")
    store: bool | None = Field(None, description="accepted; no response is stored")
    previous_response_id: unsupported(None, why="responses are not stored: send the whole conversation in input")
    background: unsupported(None, False, why="a response is generated while the request waits")
    truncation: unsupported(None, "disabled", why="an input longer than the context is refused, not cut")

    @property
    def logprobs(self) -> bool:
        return self.top_logprobs is not None or LOGPROBS_INCLUSION in (self.include or ())

    def chat_request(self) -> dict[str, Any]:
        """The chat route's body for this request (validated by `ChatCompletionRequest`)."""
        body: dict[str, Any] = {**self.model_dump(include=set(SamplingFields.model_fields), exclude_none=True),
                                **self.structured_fields()}
        body["messages"] = self._messages()
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs or 0)
        if self.tools:
            body["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                             for t in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.text is not None and self.text.format is not None:
            body["response_format"] = self.text.format.response_format()
        return body

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        thought = ""  # a reasoning item's, for the assistant's message that follows it
        for item in items:
            if isinstance(item, ReasoningItem):
                thought += "".join(part.text for part in item.content or ())
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": joined_text(item.output)})
            elif isinstance(item, MessageItem) and item.role != "assistant":
                messages.append({"role": item.role, "content": joined_text(item.content)})
            else:  # the assistant's text, or a call, which joins the assistant's message before it
                if thought or not messages or messages[-1]["role"] != "assistant" or isinstance(item, MessageItem):
                    messages.append({"role": "assistant", "content": None,
                                     **({"reasoning_content": thought} if thought else {})})
                    thought = ""
                if isinstance(item, MessageItem):
                    messages[-1]["content"] = joined_text(item.content)
                else:
                    messages[-1].setdefault("tool_calls", []).append({
                        "id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}})
        return messages


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


class ResponseWriter:
    """A response built as its reply comes: text, then the calls read from it, then its end. Each step returns
    the events of the stream (`{"event", "data"}` for sse-starlette) that tell it; `response()` is the
    response object as it stands."""

    def __init__(self, body: ResponsesRequest, response_id: str, model: str, created_at: int) -> None:
        self.body = body
        self.id = response_id
        self.model = model
        self.created_at = created_at
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.incomplete: dict[str, str] | None = None
        self.usage: dict[str, Any] | None = None
        self._message: dict[str, Any] | None = None  # the message item being written
        self._thought: dict[str, Any] | None = None  # the reasoning item being written
        self._logprobs: list[dict[str, Any]] = []  # of tokens whose text has not gone out yet
        self._sequence = itertools.count()

    def result(self) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": self.status,
            "error": None, "incomplete_details": self.incomplete, "instructions": body.instructions,
            "max_output_tokens": body.max_tokens, "metadata": body.metadata or {}, "model": self.model,
            "output": self.output, "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": None,
            "store": False, "temperature": body.temperature, "top_p": body.top_p,
            "text": {"format": {"type": "text"}} if body.text is None or body.text.format is None
            else {"format": body.text.format.model_dump(by_alias=True, exclude_none=True)},
            "tool_choice": "auto" if body.tool_choice is None and body.tools else (
                body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunctionChoice)
                else body.tool_choice or "none"),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()], "top_logprobs": body.top_logprobs,
            "usage": self.usage, "user": body.user,
        }

    def _event(self, kind: str, **fields: Any) -> dict[str, str]:
        data = {"type": kind, "sequence_number": next(self._sequence), **fields}
        return {"event": kind, "data": json.dumps(data, ensure_ascii=False)}

    def start(self) -> list[dict[str, str]]:
        return [self._event("response.created", response=self.result()),
                self._event("response.in_progress", response=self.result())]

    def reasoning(self, piece: str) -> list[dict[str, str]]:
        """`piece` added to the reply's thought, a reasoning item, which the first piece opens."""
        if not piece:
            return []
        events = []
        if self._thought is None:
            self._thought = {"type": "reasoning", "id": _id("rs"), "summary": [], "status": "in_progress",
                             "content": []}
            self.output.append(self._thought)
            events.append(self._event("response.output_item.added", output_index=len(self.output) - 1,
                                      item=self._thought))
            self._thought["content"].append({"type": "reasoning_text", "text": ""})
        self._thought["content"][0]["text"] += piece
        return [*events, self._event("response.reasoning_text.delta", **self._at(self._thought), delta=piece)]

    def _end_thought(self) -> list[dict[str, str]]:
        """The reasoning item closed, where one is open."""
        thought, self._thought = self._thought, None
        if thought is None:
            return []
        thought["status"] = "completed"
        return [self._event("response.reasoning_text.done", **self._at(thought), text=thought["content"][0]["text"]),
                self._event("response.output_item.done", output_index=self.output.index(thought), item=thought)]

    def text(self, piece: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
        """`piece` added to the reply's message, which the first piece opens (closing the thought before it);
        `logprobs`: of the tokens since the last piece (`token_logprobs`), which go out with the next text."""
        self._logprobs += logprobs or []
        if not piece:
            return []
        events = self._end_thought()
        if self._message is None:
            self._message = {"type": "message", "id": _id("msg"), "status": "in_progress", "role": "assistant",
                             "content": []}
            self.output.append(self._message)
            events += [self._event("response.output_item.added", output_index=len(self.output) - 1,
                                   item=self._message),
                       self._event("response.content_part.added", **self._at(), part=_text_part(""))]
            self._message["content"].append(_text_part(""))
        part = self._message["content"][0]
        part["text"] += piece
        part["logprobs"] += self._logprobs
        events.append(self._event("response.output_text.delta", **self._at(), delta=piece, logprobs=self._logprobs))
        self._logprobs = []
        return events

    def _at(self, item: dict[str, Any] | None = None) -> dict[str, Any]:
        """Where in the output `item` (default: the message) is, as its events say it."""
        item = item or self._message
        assert item is not None
        return {"item_id": item["id"], "output_index": self.output.index(item), "content_index": 0}

    def finish(self, calls: list[ToolCall], reason: FinishReason, stop_reason: str | int | None,
               usage: dict[str, Any]) -> list[dict[str, str]]:
        """The reply's end: its thought and message closed, its calls (each an output item) and the response's
        status."""
        events = self._end_thought()
        if self._message is not None:
            part = self._message["content"][0]
            part["logprobs"] += self._logprobs  # of tokens that brought out no text (half a character)
            self._message["status"] = "completed"
            events += [self._event("response.output_text.done", **self._at(), text=part["text"],
                                   logprobs=part["logprobs"]),
                       self._event("response.content_part.done", **self._at(), part=part),
                       self._event("response.output_item.done", output_index=self._at()["output_index"],
                                   item=self._message)]
        for call in calls:
            item = {"type": "function_call", "id": _id("fc"), "call_id": _id("call"), "name": call.name,
                    "arguments": "", "status": "in_progress"}
            self.output.append(item)
            at = {"item_id": item["id"], "output_index": len(self.output) - 1}
            events.append(self._event("response.output_item.added", output_index=at["output_index"], item=item))
            item.update(arguments=call.arguments, status="completed")
            events += [self._event("response.function_call_arguments.delta", **at, delta=call.arguments),
                       self._event("response.function_call_arguments.done", **at, arguments=call.arguments),
                       self._event("response.output_item.done", output_index=at["output_index"], item=item)]
        self.status = {FinishReason.LENGTH: "incomplete", FinishReason.CANCELLED: "cancelled"}.get(reason,
                                                                                                   "completed")
        if reason == FinishReason.LENGTH:
            self.incomplete = {"reason": "max_output_tokens"}
        self.usage = {"input_tokens": usage["prompt_tokens"], "input_tokens_details": usage["prompt_tokens_details"],
                      "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": usage["total_tokens"]}
        kind = "response.incomplete" if self.status == "incomplete" else "response.completed"
        return [*events, self._event(kind, response=self.result())]

    def error(self, error: ApiError) -> dict[str, str]:
        """The stream's last event where the generation failed after it began."""
        return self._event("error", code=error.type, message=error.message, param=None)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
