"""What every route does to serve a request: the API key, sampling parameters, prompts, submitting to
the engine loop, collecting or streaming what comes back, usage, and the OpenAPI error entries."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, replace
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from sse_starlette import EventSourceResponse

from vramlite.engine import Engine, FinishReason, Logprobs, SamplingParams
from vramlite.engine.errors import PromptTooLongError
from vramlite.server.chat import chat_prompt_ids
from vramlite.server.engine_loop import EngineLoop, Generation
from vramlite.server.errors import ApiError
from vramlite.server.reasoning import opens_in_thought
from vramlite.server.runtime import loaded, runtime
from vramlite.server.schemas import ChatCompletionRequest, ErrorBody, SamplingFields
from vramlite.server.tools import MISTRAL_TAG

T = TypeVar("T")

SSE_PING_S = 15
OPENAI_FINISH = {"eos": "stop", "cancelled": "stop"}  # OpenAI knows "stop" and "length"


_bearer = HTTPBearer(auto_error=False, description="the server's --api-key, when it has one")
_x_api_key = APIKeyHeader(name="x-api-key", auto_error=False, description="the same key, as Anthropic's clients "
                          "send it")


async def require_api_key(request: Request,
                          credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                          x_api_key: Annotated[str | None, Depends(_x_api_key)]) -> None:
    key = runtime(request).settings.api_key
    if key is None:
        return
    given = credentials.credentials if credentials else x_api_key or ""
    if not secrets.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "unauthorized", "this server needs the header `Authorization: Bearer <api key>` (or "
                       "`x-api-key: <api key>`)", {"WWW-Authenticate": "Bearer"})


async def sampling_params(engine: Engine, fields: SamplingFields) -> SamplingParams:
    """The request's sampling parameters over the model's defaults; 422 for what only the engine knows. The
    OpenAI routes without max_tokens generate until the context is full, as OpenAI and vLLM do, unless the
    model's generation_config sets max_new_tokens. A structured-output pattern is compiled here, in a worker
    thread (up to seconds, once per pattern), so that the engine's loop finds it compiled."""
    if fields.max_tokens is not None and fields.max_tokens > engine.context:
        raise ApiError(422, "validation_error",
                       f"max_tokens: {fields.max_tokens} is more than the context of {engine.context} tokens")
    kwargs = fields.sampling_kwargs()
    if kwargs["max_tokens"] is None and fields.until_context:
        kwargs["max_tokens"] = engine.defaults.get("max_tokens", engine.context)
    try:
        params = engine.sampling_params(**kwargs)
        check_token_ids(engine, [token for token, _ in params.logit_bias], "logit_bias token ids")
        check_token_ids(engine, list(params.stop_token_ids), "stop_token_ids")
        if params.structured:
            await run_in_threadpool(engine.grammars.index_for, params)
    except ValueError as e:
        raise ApiError(422, "validation_error", str(e)) from None
    return params


async def chat_params(engine: Engine, chat: ChatCompletionRequest) -> SamplingParams:
    """`sampling_params` of a chat request. A reply read for calls keeps the text of the special tokens it
    writes where the model's tokenizer has Mistral's `[TOOL_CALLS]` token, which begins its calls."""
    params = await sampling_params(engine, chat)
    tokenizer = engine.tokenizer
    if chat.tool_mode() == "auto" and tokenizer.token_to_id(MISTRAL_TAG) in tokenizer.special_ids:
        params = replace(params, skip_special_tokens=False)
    return params


async def prompt_ids(request: Request, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
    """The served model's ids of a prompt given as text (special-token strings stay text unless the settings
    allow them; BOS/EOS as the model adds them, unless `add_special_tokens` is false) or as ids."""
    if not isinstance(prompt, str):
        return prompt
    rt = runtime(request)
    special = rt.settings.allow_special_tokens  # off: "</s>" in a prompt is text, not the end of it
    return await run_in_threadpool(partial(rt.engine.tokenizer.encode, prompt, add_special_tokens,
                                           parse_special=special))


async def start_generation(request: Request, prompt: str | list[int], fields: SamplingFields) -> Generation:
    """Tokenize, check the prompt fits, and admit the request (429/503 are raised here, before any reply)."""
    params = await sampling_params(runtime(request).engine, fields)
    return submit(request, await prompt_ids(request, prompt), params)


def submit_choices(request: Request, prompts: list[list[int]], params: SamplingParams, n: int) -> list[Generation]:
    """Admit `n` generations of each prompt, prompt by prompt, all or none (OpenAI's `n`): with a seed, a
    prompt's choice i draws from seed + i, so the choices differ and each prompt's are what it gets alone."""
    loop = runtime(request).loop
    loop.check_room(len(prompts) * n, "n" if len(prompts) == 1 else "prompts × n", "choices")
    for ids in prompts:
        check_prompt(loaded(loop), ids)
    seed = params.seed
    return [submit(request, ids, params if seed is None else replace(params, seed=(seed + i + 2**63) % 2**64 - 2**63))
            for ids in prompts for i in range(n)]


def check_prompt(engine: Engine, ids: list[int]) -> None:
    """400 unless `ids` fit the engine's context and vocabulary."""
    if len(ids) >= engine.context:
        raise ApiError(400, "prompt_too_long", str(PromptTooLongError(len(ids), engine.context)))
    check_token_ids(engine, ids, "prompt token ids")


def submit(request: Request, ids: list[int], params: SamplingParams, loop: EngineLoop | None = None
           ) -> Generation:
    """Admit `ids` to `loop` (default: the served model's) after checking they fit its model."""
    loop = loop or runtime(request).loop
    engine = loaded(loop)
    check_prompt(engine, ids)
    gen = loop.submit(request.state.request_id, ids, params, request.state.start)
    request.state.generations = [*getattr(request.state, "generations", []), gen]
    request.state.tokenizer = engine.tokenizer  # for --log-prompts
    return gen


def check_token_ids(engine: Engine, ids: list[int], what: str) -> None:
    """400 unless every id is in the model's vocabulary."""
    vocab = engine.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, "invalid_request", f"{what} must be in 0..{vocab - 1}")


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Collected:
    """A non-streamed request's result: its text, why it ended, and the log-probabilities it asked for."""

    text: str
    reason: FinishReason
    logprobs: list[Logprobs]
    prompt_logprobs: tuple[Logprobs | None, ...] = ()
    embedding: list[float] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token that ended it (`StepOutput.stop_reason`)


async def collect(request: Request, gen: Generation) -> Collected:
    """The whole result of a non-streamed request; a client that hangs up cancels it (status 499 in the log)."""
    return (await collect_all(request, [gen]))[0]


async def collect_all(request: Request, gens: list[Generation]) -> list[Collected]:
    """`collect` for the generations of one request, read at once; a hang-up cancels them all."""

    async def consume(gen: Generation) -> Collected:
        done = Collected("", FinishReason.CANCELLED, [])
        async for out in runtime(request).loop.stream(gen):
            done.text += out.text
            done.reason = out.finish_reason or done.reason
            if out.logprobs is not None:
                done.logprobs.append(out.logprobs)
            done.prompt_logprobs = out.prompt_logprobs or done.prompt_logprobs
            done.embedding = out.embedding or done.embedding
            done.stop_reason = out.stop_reason if out.finished else done.stop_reason
        return done

    return await unless_disconnected(request, asyncio.gather(*(consume(gen) for gen in gens)))


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, which reads a generation; a client that hangs up cancels it (status 499)."""
    consumer = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            await asyncio.wait({consumer})  # cancelled() is only true once the task has taken the cancellation
    if consumer.cancelled():
        raise ApiError(499, "client_disconnected", "the client closed the connection")
    return consumer.result()


def sse_response(request: Request, chunks: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    """`data: <json>` per chunk, then `data: [DONE]`; an error mid-stream is one `event: error` and the end."""

    async def events() -> AsyncIterator[dict[str, str]]:
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk, ensure_ascii=False)}
        except ApiError as e:
            request.state.error = e.type
            yield {"event": "error", "data": json.dumps(e.body(), ensure_ascii=False)}
            return
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), sep="\n", ping=SSE_PING_S)


def usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": gen.num_prompt_tokens, "completion_tokens": gen.num_tokens}


def openai_usage(gens: list[Generation], prompts: int = 1) -> dict[str, Any]:
    """Each of the `prompts` once (`gens` are each prompt's choices in turn), the tokens of every choice; of the
    prompts' tokens, those the prefix cache held (`prompt_tokens_details.cached_tokens`, as OpenAI reports)."""
    firsts = gens[:: len(gens) // prompts]
    prompt = sum(gen.num_prompt_tokens for gen in firsts)
    completion = sum(gen.num_tokens for gen in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(gen.cached_tokens for gen in firsts)}}


async def merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items (never None: it marks a stream's end) of several streams as they come, each with its stream's
    index; an error in one ends all. Leaving early (a client that hangs up) cancels every stream, which aborts
    their generations."""
    queue: asyncio.Queue[tuple[int, T | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
        except Exception as e:
            await queue.put((i, e))
        else:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def openai_finish(reason: FinishReason) -> str:
    return OPENAI_FINISH.get(reason.value, reason.value)


ERROR_STATUSES = {
    400: "bad request: the prompt does not fit the context, a token id is out of the vocabulary, the model "
         "cannot do this task",
    401: "the server has an API key and the request lacks `Authorization: Bearer <api key>`",
    404: "`model` names a model this server does not serve",
    408: "the body did not arrive within the server's body timeout",
    413: "the body is over the server's limit",
    422: "validation error: a field is missing, of the wrong type or out of its bounds",
    429: "the queue is full; retry after `Retry-After` seconds",
    431: "the request headers are over the server's limit",
    500: "internal error; the server log has the details under the request id",
    503: "not ready: the model is loading, the server is draining or the engine failed",
    504: "the request took longer than the server's request timeout",
}


def error_responses(*statuses: int, body: type[BaseModel] = ErrorBody) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error `statuses`, each with the contract's error `body`."""
    return {status: {"model": body, "description": ERROR_STATUSES[status]} for status in statuses}


def text_response(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """An OpenAPI 200 entry for a reply that is text of `media_type`, its format told by `description`."""
    return {200: {"description": description, "content": {media_type: {}}}}


GENERATION_RESPONSES = {
    **text_response("text/event-stream", "JSON, or with `stream: true` server-sent events ending with "
                                         "`data: [DONE]`"),
    **error_responses(400, 408, 413, 422, 429, 431, 500, 503, 504),
}
OPENAI_RESPONSES = {**GENERATION_RESPONSES, **error_responses(404)}
TOKENIZER_RESPONSES = error_responses(400, 408, 413, 422, 431, 500, 503)


def check_model(request: Request, model: str | None) -> None:
    """404 unless `model` (where a body gives one) names the served model."""
    name = runtime(request).model_name
    if model is not None and model != name:
        raise ApiError(404, "model_not_found", f"model {model!r} is not served here; this server serves {name!r}")


def starts_in_thought(request: Request, prompt_ids: list[int]) -> bool | None:
    """Whether the reply to this chat prompt starts inside a thought (`reasoning.opens_in_thought`), or None
    where the server leaves thoughts in the text (`reasoning_format` "none")."""
    if runtime(request).settings.reasoning_format == "none":
        return None
    tail = prompt_ids[-32:]  # "<think>" and some whitespace, even a byte token a character
    return opens_in_thought(runtime(request).engine.tokenizer.decode(tail, skip_special_tokens=False))


async def chat_ids(request: Request, body: ChatCompletionRequest) -> list[int]:
    """The prompt of a chat request: its messages and tools in the model's chat template."""
    return await run_in_threadpool(partial(
        chat_prompt_ids, runtime(request).engine.tokenizer, [m.for_template() for m in body.messages],
        body.tool_dicts(), body.chat_template_kwargs, add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message))


def protected_router() -> APIRouter:
    """A router whose routes need the API key, when the server has one."""
    return APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(401))
