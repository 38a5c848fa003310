"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from vramlite.engine import Logprobs, StepOutput
from vramlite.engine.detokenizer import texts_at
from vramlite.engine.errors import UnsupportedTaskError
from vramlite.engine.fill_blank import fill_format, infill_ids
from vramlite.server.engine_loop import Generation
from vramlite.server.errors import ApiError
from vramlite.server.logprobs import CompletionLogprobs, chat_logprobs
from vramlite.server.reasoning import split_thought
from vramlite.server.reply_reader import ReplyReader
from vramlite.server.runtime import runtime
from vramlite.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from vramlite.server.serving import (
    OPENAI_RESPONSES,
    Collected,
    chat_ids,
    chat_params,
    check_model,
    check_prompt,
    collect_all,
    error_responses,
    merged,
    openai_finish,
    openai_usage,
    prompt_ids,
    protected_router,
    sampling_params,
    sse_response,
    starts_in_thought,
    submit,
    submit_choices,
    text_response,
)
from vramlite.server.tools import read_calls

router = protected_router()


@router.get("/v1/models", summary="OpenAI- and Anthropic-compatible: the served model")
async def list_models(request: Request) -> dict[str, Any]:
    name = runtime(request).model_name
    return {"object": "list", "data": [_model_card(request)], "has_more": False, "first_id": name, "last_id": name}


@router.get("/v1/models/{model:path}", responses=error_responses(404),
               summary="OpenAI- and Anthropic-compatible: the served model, by its name")
async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    check_model(request, model)
    return _model_card(request)


def _model_card(request: Request) -> dict[str, Any]:
    """The served model as OpenAI's clients read it (`object`, `owned_by`, `created`) and Anthropic's (`type`,
    `display_name`, `created_at`), with its context where it is loaded (vLLM's `max_model_len`)."""
    rt = runtime(request)
    card = {"id": rt.model_name, "object": "model", "owned_by": "vramlite", "created": 0, "type": "model",
            "display_name": rt.model_name, "created_at": "1970-01-01T00:00:00Z"}
    if rt.loop.engine is not None:
        card.update(max_model_len=rt.loop.engine.context, max_input_tokens=rt.loop.engine.context)
    return card


@router.post("/v1/completions", responses=OPENAI_RESPONSES, summary="OpenAI-compatible text completion")
async def completions(request: Request, body: CompletionRequest) -> Any:
    check_model(request, body.model)
    rt = runtime(request)
    params = await sampling_params(rt.engine, body)
    prompts = body.prompts()
    if body.suffix:
        ids, stops = await _infill_ids(request, body)
        params = replace(params, stop_token_ids=(*params.stop_token_ids, *stops))
        batch = [ids]
    else:
        batch = [await prompt_ids(request, prompt) for prompt in prompts]
    gens = submit_choices(request, batch, params, body.n)
    head = {"id": f"cmpl-{gens[0].request_id}", "object": "text_completion", "created": int(time.time()),
            "model": rt.model_name}
    echoes: list[str | None] = [None] * len(gens)
    if body.echo:
        texts = [p if isinstance(p, str) else rt.engine.tokenizer.decode(p) for p in prompts]
        echoes = [texts[i // body.n] for i in range(len(gens))]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(request, _completion_chunks(request, gens, head, include_usage, echoes, len(batch)))
    choices = []
    for i, (gen, echo, done) in enumerate(zip(gens, echoes, await collect_all(request, gens), strict=True)):
        logprobs = None if body.logprobs is None else CompletionLogprobs()(
            [*_echoed_logprobs(request, gen, echo, done.prompt_logprobs), *done.logprobs])
        choices.append({"index": i, "text": (echo or "") + done.text, "logprobs": logprobs,
                        "finish_reason": openai_finish(done.reason), "stop_reason": done.stop_reason})
    return {**head, "choices": choices, "usage": openai_usage(gens, len(batch))}


async def _infill_ids(request: Request, body: CompletionRequest) -> tuple[list[int], tuple[int, ...]]:
    """A completion between the prompt and its `suffix`: the served model's fill-in-the-middle input and the
    tokens that end the middle (400 for a model that cannot fill in; 422 for what a middle cannot go with)."""
    if not isinstance(body.prompt, str) or body.echo:
        raise ApiError(422, "validation_error", "suffix: needs one text prompt, and no echo")
    rt = runtime(request)
    engine = rt.engine
    try:
        fmt = fill_format(engine.config, engine.tokenizer, engine.eos_ids)
    except UnsupportedTaskError as e:
        raise ApiError(400, "unsupported_task", f"suffix: {e}") from None
    return await run_in_threadpool(partial(infill_ids, fmt, engine.tokenizer, body.prompt, body.suffix,
                                           parse_special=rt.settings.allow_special_tokens))


async def _openai_pieces(request: Request, gen: Generation
                         ) -> AsyncIterator[tuple[StepOutput, str | None, list[Logprobs]]]:
    """Each output of `gen`, its OpenAI finish reason (None until the last), and the log-probabilities of the
    tokens since the last output that brought out text or finished: a token whose text is held back (half a
    character) sends its log-probability with the next piece of text."""
    pending: list[Logprobs] = []
    async for out in runtime(request).loop.stream(gen):
        finish = openai_finish(out.finish_reason) if out.finished else None
        if out.logprobs is not None:
            pending.append(out.logprobs)
        tokens = pending
        if out.text or finish:
            pending = []
        yield out, finish, tokens


def _echoed_logprobs(request: Request, gen: Generation, echo: str | None, prompt: Sequence[Logprobs | None]
                     ) -> list[Logprobs | str]:
    """The echoed prompt's tokens for `CompletionLogprobs`: the first as its text alone (it has no probability),
    then the engine's log-probabilities of the others; none without echo."""
    if echo is None:
        return []
    first = texts_at(runtime(request).engine.tokenizer, gen.prompt_ids, 0, gen.prompt_ids[:1])[0]
    return [first, *prompt[1:]]


async def _completion_chunks(request: Request, gens: list[Generation], head: dict[str, Any], include_usage: bool,
                             echoes: list[str | None], prompts: int) -> AsyncIterator[dict[str, Any]]:
    """The choices' pieces as they come, each chunk naming its choice by `index`; `echoes[i]`: choice i's prompt
    text, where echoed."""
    asked = gens[0].params.logprobs is not None
    logprobs = [CompletionLogprobs() if asked else None for _ in gens]
    echoed = [echo is None for echo in echoes]
    async for i, (out, finish, tokens) in merged([_openai_pieces(request, gen) for gen in gens]):
        if not echoed[i]:  # the prompt first, its log-probabilities (if asked) coming with the first output
            echoed[i] = True
            scored = _echoed_logprobs(request, gens[i], echoes[i], out.prompt_logprobs or ())
            piece = None if logprobs[i] is None else logprobs[i](scored)
            yield {**head, "choices": [{"index": i, "text": echoes[i], "logprobs": piece, "finish_reason": None}]}
        if out.text or finish:
            piece = None if logprobs[i] is None else logprobs[i](tokens)
            yield {**head, "choices": [{"index": i, "text": out.text, "logprobs": piece, "finish_reason": finish,
                                        "stop_reason": out.stop_reason}]}
    if include_usage:
        yield {**head, "choices": [], "usage": openai_usage(gens, prompts)}


@router.post("/v1/chat/completions", responses=OPENAI_RESPONSES,
                summary="OpenAI-compatible chat completion (the model's chat template)")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
    check_model(request, body.model)
    rt = runtime(request)
    params = await chat_params(rt.engine, body)
    tools = body.tool_dicts()
    ids = await chat_ids(request, body)
    gens = submit_choices(request, [ids], params, body.n)
    head = {"id": f"chatcmpl-{gens[0].request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": rt.model_name}
    mode = body.tool_mode()
    thinking = starts_in_thought(request, ids)
    reply = partial(_chat_choice, tools=tools, mode=mode, logprobs=bool(body.logprobs), thinking=thinking)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunk_head = {**head, "object": "chat.completion.chunk"}
        if mode in ("none", "auto"):
            chunks = _chat_chunks(request, gens, chunk_head, include_usage, tools if mode == "auto" else None,
                                  thinking)
        else:
            chunks = _chat_chunks_read_for_calls(request, gens, chunk_head, include_usage, reply)
        return sse_response(request, chunks)
    choices = [reply(i, done) for i, done in enumerate(await collect_all(request, gens))]
    return {**head, "choices": choices, "usage": openai_usage(gens)}


@router.post("/v1/embeddings", responses={**OPENAI_RESPONSES, **text_response("application/json", "the embeddings")},
                summary="OpenAI-compatible embeddings: each input's final hidden states, pooled and L2-normalized")
async def embeddings(request: Request, body: EmbeddingRequest) -> Any:
    check_model(request, body.model)
    rt = runtime(request)
    try:
        params = rt.engine.embedding_params()
    except UnsupportedTaskError as e:
        raise ApiError(400, "unsupported_task", str(e)) from None
    inputs = [await prompt_ids(request, x) for x in body.inputs()]
    empty = [i for i, ids in enumerate(inputs) if not ids]
    if empty:
        raise ApiError(400, "invalid_request", f"input {empty[0]} is empty and the tokenizer adds no BOS token")
    rt.loop.check_room(len(inputs), "input", "inputs")
    for ids in inputs:  # all before any is admitted
        check_prompt(rt.engine, ids)
    gens = [submit(request, ids, params) for ids in inputs]
    data = []
    for i, done in enumerate(await collect_all(request, gens)):
        if done.embedding is None:  # cancelled by a drain (which answers 503 first) or the engine's backstop
            raise ApiError(500, "internal_error", f"input {i} got no embedding")
        vector: list[float] | str = done.embedding
        if body.encoding_format == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(done.embedding)}f", *done.embedding)).decode()
        data.append({"object": "embedding", "index": i, "embedding": vector})
    tokens = sum(len(ids) for ids in inputs)
    return {"object": "list", "data": data, "model": rt.model_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _chat_choice(index: int, done: Collected, tools: list[dict[str, Any]] | None, mode: str | dict[str, Any],
                 logprobs: bool, thinking: bool | None) -> dict[str, Any]:
    """One chat choice from its generation: its thought apart where `thinking` is not None (`starts_in_thought`), the
    tool calls in the answer read as `mode` asks (`tools.read_calls`)."""
    thought, text = (None, done.text) if thinking is None else split_thought(done.text, thinking)
    content, calls = (text, []) if tools is None else read_calls(text, tools, mode)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if thought is not None and not content:
        message["content"] = None  # all thought, no answer: as vLLM's reasoning parsers leave it
    if thought is not None:
        message["reasoning_content"] = thought
    finish = openai_finish(done.reason)
    if calls:
        message["tool_calls"] = [call.to_openai() for call in calls]
        finish = "tool_calls" if finish == "stop" else finish
    return {"index": index, "message": message, "logprobs": chat_logprobs(done.logprobs) if logprobs else None,
            "finish_reason": finish, "stop_reason": done.stop_reason}


async def _chat_chunks_read_for_calls(request: Request, gens: list[Generation], head: dict[str, Any],
                                      include_usage: bool, reply: Callable[[int, Collected], dict[str, Any]]
                                      ) -> AsyncIterator[dict[str, Any]]:
    """A stream of a request whose tool_choice forces calls: a reply is read for calls whole, so each choice
    comes complete, in one chunk after its role's (its calls, each with its `index`)."""
    for i in range(len(gens)):
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
    for i, done in enumerate(await collect_all(request, gens)):
        choice = reply(i, done)
        message = choice.pop("message")
        delta = {} if message["content"] is None else {"content": message["content"]}
        if "tool_calls" in message:
            delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(message["tool_calls"])]
        yield {**head, "choices": [{**choice, "delta": delta}]}
    if include_usage:
        yield {**head, "choices": [], "usage": openai_usage(gens)}


async def _chat_chunks(request: Request, gens: list[Generation], head: dict[str, Any], include_usage: bool,
                       tools: list[dict[str, Any]] | None = None, thinking: bool | None = None
                       ) -> AsyncIterator[dict[str, Any]]:
    """Each choice's role first, then the choices' pieces as they come, each chunk naming its choice. Where
    `thinking` is not None, a thought goes out as `reasoning_content` (`ThoughtSplitter`). With `tools` ("auto"),
    answer text that may be a call is held back (`CallWatcher`), and the calls read from the whole answer come
    with its last chunk."""
    for i in range(len(gens)):
        yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "finish_reason": None}]}
    asked = gens[0].params.logprobs is not None
    readers = [ReplyReader(tools, thinking) for _ in gens]
    async for i, (out, finish, tokens) in merged([_openai_pieces(request, gen) for gen in gens]):
        thought, text, calls = readers[i].feed(out.text, finish is not None)
        if thought or text or finish:
            delta: dict[str, Any] = {"content": text} if text else {}
            if thought:
                delta["reasoning_content"] = thought
            if calls:
                delta["tool_calls"] = [call.to_openai(index=j) for j, call in enumerate(calls)]
                finish = "tool_calls" if finish == "stop" else finish
            piece = chat_logprobs(tokens) if asked else None
            yield {**head, "choices": [{"index": i, "delta": delta, "logprobs": piece, "finish_reason": finish,
                                        "stop_reason": out.stop_reason}]}
    if include_usage:
        yield {**head, "choices": [], "usage": openai_usage(gens)}
