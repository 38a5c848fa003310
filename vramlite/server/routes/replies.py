"""Chat replies in other APIs' formats: OpenAI's Responses (/v1/responses) and Anthropic's Messages
(/v1/messages), each a writer of its format over the chat route's generation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sse_starlette import EventSourceResponse

from vramlite.engine import FinishReason
from vramlite.server.anthropic_messages import CountTokensRequest, MessagesRequest, MessageWriter
from vramlite.server.engine_loop import Generation
from vramlite.server.errors import ApiError
from vramlite.server.logprobs import token_logprobs
from vramlite.server.reasoning import split_thought
from vramlite.server.reply_reader import ReplyReader
from vramlite.server.responses import ResponsesRequest, ResponseWriter
from vramlite.server.runtime import runtime
from vramlite.server.schemas import AnthropicErrorBody, ChatCompletionRequest
from vramlite.server.serving import (
    OPENAI_RESPONSES,
    SSE_PING_S,
    Collected,
    chat_ids,
    chat_params,
    check_model,
    collect,
    error_responses,
    openai_usage,
    protected_router,
    starts_in_thought,
    submit_choices,
)
from vramlite.server.tools import ToolCall, read_calls

router = protected_router()
MESSAGES_RESPONSES = {**OPENAI_RESPONSES, **error_responses(
    401, *(status for status in OPENAI_RESPONSES if status != 200), body=AnthropicErrorBody)}


class ReplyWriter(Protocol):
    """A chat reply in another API's format (`ResponseWriter`, `MessageWriter`): each step returns the events
    of its stream, and `result()` the whole reply."""

    def start(self) -> list[dict[str, str]]: ...
    def reasoning(self, piece: str) -> list[dict[str, str]]: ...
    def text(self, piece: str, logprobs: list[dict[str, Any]] | None = None) -> list[dict[str, str]]: ...
    def finish(self, calls: list[ToolCall], reason: FinishReason, stop_reason: str | int | None,
               usage: dict[str, Any]) -> list[dict[str, str]]: ...
    def error(self, error: ApiError) -> dict[str, str]: ...
    def result(self) -> dict[str, Any]: ...


def _chat_of(body: dict[str, Any]) -> ChatCompletionRequest:
    """The chat request another API's request stands for; 422 where it is not a valid one."""
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None


async def _serve_reply(request: Request, chat: ChatCompletionRequest, stream: bool,
                       make_writer: Callable[[Generation], ReplyWriter]) -> Any:
    """Generate `chat`'s reply, written whole or streamed by the writer in its API's format."""
    params = await chat_params(runtime(request).engine, chat)
    ids = await chat_ids(request, chat)
    gen = submit_choices(request, [ids], params, 1)[0]
    writer = make_writer(gen)
    tools, mode, thinking = chat.tool_dicts(), chat.tool_mode(), starts_in_thought(request, ids)
    if stream:
        return EventSourceResponse(_reply_events(request, gen, writer, tools, mode, thinking), sep="\n",
                                   ping=SSE_PING_S)
    _write_whole(writer, gen, await collect(request, gen), tools, mode, thinking)
    return writer.result()


def _write_whole(writer: ReplyWriter, gen: Generation, done: Collected, tools: list[dict[str, Any]] | None,
                 mode: str | dict[str, Any], thinking: bool | None) -> list[dict[str, str]]:
    """A whole reply written at once, its thought apart (`starts_in_thought`) and its answer read for calls as `mode`
    asks: its events."""
    thought, text = (None, done.text) if thinking is None else split_thought(done.text, thinking)
    content, calls = (text, []) if tools is None else read_calls(text, tools, mode)
    return [*writer.reasoning(thought or ""), *writer.text(content or "", token_logprobs(done.logprobs)),
            *writer.finish(calls, done.reason, done.stop_reason, openai_usage([gen]))]


async def _reply_events(request: Request, gen: Generation, writer: ReplyWriter, tools: list[dict[str, Any]] | None,
                        mode: str | dict[str, Any], thinking: bool | None) -> AsyncIterator[dict[str, str]]:
    """The writer's events for `gen`: its thought and then its answer as they come ("auto" holds back what may
    be a call, as the chat route does), or under a forced tool choice the calls once the reply is whole; an
    error ends the stream."""
    try:
        for event in writer.start():
            yield event
        if mode not in ("none", "auto"):
            for event in _write_whole(writer, gen, await collect(request, gen), tools, mode, thinking):
                yield event
            return
        reader = ReplyReader(tools if mode == "auto" else None, thinking)
        async for out in runtime(request).loop.stream(gen):
            thought, text, calls = reader.feed(out.text, out.finished)
            for event in [*writer.reasoning(thought),
                          *writer.text(text, None if out.logprobs is None else token_logprobs([out.logprobs]))]:
                yield event
            if out.finished:
                for event in writer.finish(calls, out.finish_reason or FinishReason.CANCELLED, out.stop_reason,
                                           openai_usage([gen])):
                    yield event
    except ApiError as e:
        request.state.error = e.type
        yield writer.error(e)


@router.post("/v1/responses", responses=OPENAI_RESPONSES,
                summary="OpenAI-compatible Responses API, stateless (the chat template; nothing is stored)")
async def responses(request: Request, body: ResponsesRequest) -> Any:
    check_model(request, body.model)
    name = runtime(request).model_name
    return await _serve_reply(request, _chat_of(body.chat_request()), body.stream, lambda gen: ResponseWriter(
        body, f"resp_{gen.request_id}", name, int(time.time())))


@router.post("/v1/messages", responses=MESSAGES_RESPONSES,
                summary="Anthropic-compatible Messages API (the chat template)")
async def messages(request: Request, body: MessagesRequest) -> Any:
    check_model(request, body.model)
    rt = runtime(request)
    if body.wants_thought and rt.settings.reasoning_format == "none":
        raise ApiError(422, "validation_error", "thinking: this server leaves thoughts in the text; start it with "
                       "--reasoning-format think for thinking blocks, or send thinking disabled")
    name = rt.model_name
    return await _serve_reply(request, _chat_of(body.chat_request()), body.stream, lambda gen: MessageWriter(
        f"msg_{gen.request_id}", name, gen.num_prompt_tokens))


@router.post("/v1/messages/count_tokens", responses=MESSAGES_RESPONSES,
                summary="Anthropic-compatible: the tokens of a Messages request's prompt")
async def count_tokens(request: Request, body: CountTokensRequest) -> dict[str, int]:
    check_model(request, body.model)
    return {"input_tokens": len(await chat_ids(request, _chat_of(body.chat_request())))}
