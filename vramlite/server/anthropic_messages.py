"""Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) over the chat route: a
request's system prompt, messages and content blocks become chat messages, and the reply, read for tool calls as
chat reads it, becomes a message of `text` and `tool_use` blocks or its stream of events.

A last message of the assistant's is a prefill, which the reply continues; thinking blocks sent back go to the
template as the assistant's thought; the `thinking` parameter sets the chat template's `enable_thinking`, and
asks for the thought as a thinking block (where the server splits thoughts). Text in, text out: image and document
blocks and server tools are refused.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, Tag, model_validator

from vramlite.engine import FinishReason
from vramlite.engine.sampler import MAX_STOP_STRINGS
from vramlite.server.errors import ApiError
from vramlite.server.schemas import (
    MAX_MODEL_NAME_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TOOL_NAME_CHARS,
    MAX_TOOLS,
    MaxTokens,
    OpenAIBody,
    SamplingFields,
    StopString,
    StructuredFields,
    by_type,
    joined_text,
)
from vramlite.server.tools import ToolCall, json_or_none

MAX_MESSAGES = 4096
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
BlockId = Annotated[str, Field(min_length=1, max_length=256)]


class TextBlock(OpenAIBody):
    type: Literal["text"]
    text: Text


class ToolUseBlock(OpenAIBody):
    """A call the assistant made earlier in the conversation."""

    type: Literal["tool_use"]
    id: BlockId
    name: str = Field(max_length=MAX_TOOL_NAME_CHARS)
    input: dict[str, Any]


class ToolResultBlock(OpenAIBody):
    """What a call returned, in a user's message."""

    type: Literal["tool_result"]
    tool_use_id: BlockId
    content: Text | list[TextBlock] = ""
    is_error: bool | None = None


class ThinkingBlock(OpenAIBody):
    """A thought the model wrote earlier (`reasoning_format` "think"), sent back as Anthropic's clients replay
    them: it goes to the template as the assistant message's `reasoning_content`."""

    type: Literal["thinking"]
    thinking: Text


class RedactedThinkingBlock(OpenAIBody):
    """Another server's encrypted thought: there is nothing in it to read, and it is dropped."""

    type: Literal["redacted_thinking"]


Block = Annotated[Annotated[TextBlock, Tag("text")] | Annotated[ToolUseBlock, Tag("tool_use")]
                  | Annotated[ToolResultBlock, Tag("tool_result")] | Annotated[ThinkingBlock, Tag("thinking")]
                  | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")], by_type("text")]


class Message(OpenAIBody):
    role: Literal["user", "assistant"]
    content: Text | list[Block]  # bounded by the body limit, as chat's content parts

    @model_validator(mode="after")
    def _blocks_of_its_role(self) -> Message:
        wrong = ("tool_result",) if self.role == "assistant" else ("tool_use", "thinking", "redacted_thinking")
        found = [block.type for block in self.content if block.type in wrong] if isinstance(self.content, list) \
            else []
        if found:
            raise ValueError(f"a {self.role}'s message cannot have {found[0]} blocks")
        return self


class Tool(OpenAIBody):
    type: Literal["custom"] | None = None
    name: str = Field(min_length=1, max_length=MAX_TOOL_NAME_CHARS, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    input_schema: dict[str, Any]


class ToolChoice(OpenAIBody):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, max_length=MAX_TOOL_NAME_CHARS)
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_for_tool(self) -> ToolChoice:
        if (self.name is not None) != (self.type == "tool"):
            raise ValueError('name goes with type "tool", and only with it')
        return self

    def chat(self) -> str | dict[str, Any]:
        """The chat route's `tool_choice`."""
        if self.type == "tool":
            return {"type": "function", "function": {"name": self.name}}
        return "required" if self.type == "any" else self.type


class OutputFormat(OpenAIBody):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(OpenAIBody):
    """`output_config`: `format` holds the output to a JSON schema (structured output); `effort` is ignored."""

    format: OutputFormat | None = None


class Thinking(OpenAIBody):
    """`thinking`: "enabled" (with `budget_tokens`, taken but not enforced: the thought counts against
    `max_tokens`), "adaptive" or "disabled"; the chat template's `enable_thinking` (Qwen 3's) follows it."""

    type: Literal["enabled", "adaptive", "disabled"]
    budget_tokens: int | None = Field(None, ge=1, description="with enabled: under max_tokens (Anthropic's API also "
                                      "wants 1024 at least; a small local model may think less)")

    @model_validator(mode="after")
    def _budget(self) -> Thinking:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ValueError("enabled thinking needs budget_tokens")
        return self


class MessagesRequest(SamplingFields, StructuredFields):
    """`POST /v1/messages`: Anthropic's Messages API; the sampling fields of the other routes too."""

    model_config = ConfigDict(extra="ignore")
    until_context: ClassVar[bool] = True

    model: str = Field(max_length=MAX_MODEL_NAME_CHARS, description="the served model's name")
    max_tokens: MaxTokens = Field(description="tokens to generate at most")
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: Text | list[TextBlock] | None = Field(None, description="a system message before the messages")
    stop_sequences: list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS, description="tools the model may call; the chat "
                                     "template describes them to it")
    tool_choice: ToolChoice | None = Field(None, description='"auto" (the default with tools), "any" (a call), '
                                           '"tool" (that one) or "none"')
    output_config: OutputConfig | None = Field(None, description='`format`: {"type": "json_schema", "schema": '
                                               '{...}} holds the output to the schema')
    metadata: dict[str, Any] | None = None
    thinking: Thinking | None = Field(None, description="enabled / adaptive: the reply's thought comes back as a "
                                      "thinking block (needs the server's --reasoning-format think); disabled: the "
                                      "template is asked not to think")

    @model_validator(mode="after")
    def _thinking_budget(self) -> MessagesRequest:
        budget = None if self.thinking is None else self.thinking.budget_tokens
        if budget is not None and self.max_tokens is not None and budget >= self.max_tokens:
            raise ValueError(f"max_tokens must be greater than thinking.budget_tokens ({budget})")
        return self

    @property
    def wants_thought(self) -> bool:
        """Whether the client asked for the reply's thought (thinking enabled or adaptive)."""
        return self.thinking is not None and self.thinking.type != "disabled"

    def chat_request(self) -> dict[str, Any]:
        """The chat route's body for this request (validated by `ChatCompletionRequest`)."""
        body: dict[str, Any] = {**self.model_dump(include=set(SamplingFields.model_fields), exclude_none=True),
                                **self.structured_fields()}
        if self.stop_sequences:
            body["stop"] = [*body.get("stop", ()), *self.stop_sequences]
        body["messages"] = self._messages()
        if self.tools:
            body["tools"] = [{"type": "function", "function": {
                "name": t.name, "parameters": t.input_schema,
                **({} if t.description is None else {"description": t.description})}} for t in self.tools]
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice.chat()
        if self.output_config is not None and self.output_config.format is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"schema": self.output_config.format.schema_}}
        if self.thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.wants_thought}
        if self.messages[-1].role == "assistant":  # a prefill: the model continues the assistant's text
            body.update(add_generation_prompt=False, continue_final_message=True)
        return body

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system is not None:
            messages.append({"role": "system", "content": joined_text(self.system)})
        for message in self.messages:
            blocks = [TextBlock(type="text", text=message.content)] if isinstance(message.content, str) \
                else message.content
            if message.role == "assistant":
                text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
                thought = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
                calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(
                    b.input, ensure_ascii=False)}} for b in blocks if isinstance(b, ToolUseBlock)]
                messages.append({"role": "assistant", "content": text if text or not calls else None,
                                 **({"tool_calls": calls} if calls else {}),
                                 **({"reasoning_content": thought} if thought else {})})
                continue
            text = ""  # a user's text blocks, joined; a tool result between them ends the text before it
            for block in blocks:
                if isinstance(block, ToolResultBlock):
                    if text:
                        messages.append({"role": "user", "content": text})
                        text = ""
                    messages.append({"role": "tool", "tool_call_id": block.tool_use_id,
                                     "content": joined_text(block.content)})
                else:
                    text += block.text
            if text or not blocks:
                messages.append({"role": "user", "content": text})
        return messages


class CountTokensRequest(MessagesRequest):
    """`POST /v1/messages/count_tokens`: a Messages request's prompt, measured."""

    max_tokens: MaxTokens | None = None


STOP_REASONS = {FinishReason.LENGTH: "max_tokens", FinishReason.STOP: "stop_sequence"}


class MessageWriter:
    """A message built as its reply comes: text, then the calls read from it, then its end. Each step returns
    the events of the stream (`{"event", "data"}` for sse-starlette) that tell it; `result()` is the message
    as it stands."""

    def __init__(self, message_id: str, model: str, input_tokens: int) -> None:
        self.message: dict[str, Any] = {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 0}}
        self._text: dict[str, Any] | None = None  # the text block being written
        self._thinking: dict[str, Any] | None = None  # the thinking block being written

    def result(self) -> dict[str, Any]:
        return self.message

    @staticmethod
    def _event(kind: str, **fields: Any) -> dict[str, str]:
        return {"event": kind, "data": json.dumps({"type": kind, **fields}, ensure_ascii=False)}

    def start(self) -> list[dict[str, str]]:
        return [self._event("message_start", message=self.message)]

    def reasoning(self, piece: str) -> list[dict[str, str]]:
        """`piece` added to the reply's thought, a thinking block, which the first piece opens."""
        if not piece:
            return []
        content = self.message["content"]
        events = []
        if self._thinking is None:
            self._thinking = {"type": "thinking", "thinking": "", "signature": ""}
            content.append(self._thinking)
            events.append(self._event("content_block_start", index=len(content) - 1,
                                      content_block=dict(self._thinking)))
        self._thinking["thinking"] += piece
        return [*events, self._event("content_block_delta", index=content.index(self._thinking),
                                     delta={"type": "thinking_delta", "thinking": piece})]

    def _end_thinking(self) -> list[dict[str, str]]:
        """The thinking block closed, where one is open."""
        block, self._thinking = self._thinking, None
        return [] if block is None else [self._event("content_block_stop", index=self.message["content"].index(block))]

    def text(self, piece: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, str]]:
        """`piece` added to the reply's text block, which the first piece opens, closing the thought before it
        (log-probabilities: none here)."""
        if not piece:
            return []
        events = self._end_thinking()
        content = self.message["content"]
        if self._text is None:
            self._text = {"type": "text", "text": ""}
            content.append(self._text)
            events.append(self._event("content_block_start", index=len(content) - 1,
                                      content_block={"type": "text", "text": ""}))
        self._text["text"] += piece
        return [*events, self._event("content_block_delta", index=content.index(self._text),
                                     delta={"type": "text_delta", "text": piece})]

    def finish(self, calls: list[ToolCall], reason: FinishReason, stop_reason: str | int | None,
               usage: dict[str, Any]) -> list[dict[str, str]]:
        """The reply's end: its text block closed, its calls (each a `tool_use` block) and why it stopped. A call
        whose arguments are not a JSON object (cut short by max_tokens) stays text."""
        content = self.message["content"]
        events = self._end_thinking()
        uses = []
        for call in calls:
            arguments = json_or_none(call.arguments)
            if not isinstance(arguments, dict):
                events += self.text(call.arguments)
            else:
                uses.append((call, arguments))
        if self._text is not None:
            events.append(self._event("content_block_stop", index=content.index(self._text)))
        for call, arguments in uses:
            block = {"type": "tool_use", "id": f"toolu_{secrets.token_hex(12)}", "name": call.name, "input": {}}
            content.append(block)
            index = len(content) - 1
            events += [self._event("content_block_start", index=index, content_block=dict(block)),
                       self._event("content_block_delta", index=index,
                                   delta={"type": "input_json_delta", "partial_json": call.arguments}),
                       self._event("content_block_stop", index=index)]
            block["input"] = arguments
        stop = "tool_use" if uses and reason != FinishReason.LENGTH else STOP_REASONS.get(reason, "end_turn")
        sequence = stop_reason if stop == "stop_sequence" and isinstance(stop_reason, str) else None
        stop = "end_turn" if stop == "stop_sequence" and sequence is None else stop  # a stop token, not a string
        self.message.update(stop_reason=stop, stop_sequence=sequence)
        cached = usage["prompt_tokens_details"]["cached_tokens"]  # Anthropic counts them apart from input_tokens
        self.message["usage"].update(input_tokens=usage["prompt_tokens"] - cached, cache_read_input_tokens=cached,
                                     cache_creation_input_tokens=0, output_tokens=usage["completion_tokens"])
        return [*events, self._event("message_delta", delta={"stop_reason": stop, "stop_sequence": sequence},
                                     usage=self.message["usage"]),
                self._event("message_stop")]

    def error(self, error: ApiError) -> dict[str, str]:
        """The stream's last event where the generation failed after it began."""
        return self._event("error", error={"type": error.anthropic_type, "message": error.message})


