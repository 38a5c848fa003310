"""The FastAPI app: routes of the HTTP contract (DESIGN.md), SSE streaming, auth, request logging.

Thin by design: handlers validate, tokenize, `submit` to the engine loop and format what comes back.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vramlite import __version__
from vramlite import models as demo_models
from vramlite.engine import Engine, FinishReason, Logprobs, SamplingParams, StepOutput
from vramlite.engine.detokenizer import texts_at
from vramlite.engine.device import pick_device, pick_dtype
from vramlite.engine.errors import PromptTooLongError, UnsupportedTaskError
from vramlite.engine.fill_blank import BlankCountError, FillRequest, fill_format, infill_ids
from vramlite.engine.loader import plan_from_config
from vramlite.engine.offload.planner import format_bytes
from vramlite.server.anthropic_messages import CountTokensRequest, MessagesRequest, MessageWriter
from vramlite.server.chat import chat_prompt_ids
from vramlite.server.engine_loop import EngineLoop, Generation
from vramlite.server.errors import ApiError, install_error_handlers
from vramlite.server.guards import RequestLimitsMiddleware
from vramlite.server.logprobs import CompletionLogprobs, chat_logprobs, generate_logprobs, token_logprobs
from vramlite.server.metrics import Metrics
from vramlite.server.playground import install_playground
from vramlite.server.reasoning import ThoughtSplitter, opens_in_thought, split_thought
from vramlite.server.responses import ResponsesRequest, ResponseWriter
from vramlite.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    ErrorBody,
    FillBlankRequest,
    FillBlankResponse,
    GenerateRequest,
    GenerateResponse,
    SamplingFields,
    Stats,
    TokenizeRequest,
    TokenizeResponse,
)
from vramlite.server.settings import Settings
from vramlite.server.tools import MISTRAL_TAG, CallWatcher, ToolCall, read_calls

log = logging.getLogger("vramlite.server")
T = TypeVar("T")

SSE_PING_S = 15
ENGINE_ROUTES = frozenset({"/generate", "/fill_blank", "/v1/completions", "/v1/chat/completions", "/v1/responses",
                           "/v1/messages", "/v1/embeddings"})  # logged at INFO, one line per request
OPENAI_FINISH = {"eos": "stop", "cancelled": "stop"}  # OpenAI knows "stop" and "length"
MAX_REQUEST_ID_CHARS = 64


def model_dir(settings: Settings) -> Path:
    return Path(settings.model) if settings.model else demo_models.path()


def served_model_name(settings: Settings) -> str:
    return settings.served_model_name or model_dir(settings).name


def fill_model_dir(settings: Settings) -> Path | None:
    """The model that answers /fill_blank when it is not the served one (see the `fill_model` setting)."""
    if settings.fill_model == "none":
        return None
    if settings.fill_model:
        return Path(settings.fill_model)
    demo = demo_models.path(demo_models.FILL_BLANK)
    return demo if settings.model is None and demo.is_dir() else None


def engine_loader(settings: Settings, path: Path | None = None) -> Callable[[], Engine]:
    """What the engine thread calls to load the model the settings name, or the model at `path` (the fill
    model: same device, dtype and quantization, wholly resident, its memory taken from the served model's
    `memory_limit`; see `served_memory_limit`)."""
    def load() -> Engine:
        return Engine.from_dir(path or model_dir(settings), device=settings.device, dtype=settings.dtype,
                               max_batch_size=settings.max_batch_size, context=None if path else settings.context,
                               max_tokens_per_step=settings.max_tokens_per_step, quantize=quantization(settings),
                               memory_limit=None if path else served_memory_limit(settings),
                               prefetch_depth=settings.prefetch_depth, compile_decode=settings.compile_decode,
                               cpu_layout=settings.cpu_layout, prefix_caching=settings.prefix_caching,
                               speculative_tokens=settings.speculative_tokens,
                               speculative_max_batch=settings.speculative_max_batch,
                               kv_cache_dtype=settings.kv_cache_dtype, lora=() if path else settings.lora_adapters,
                               pattern_timeout=settings.pattern_timeout)

    return load


def quantization(settings: Settings) -> str | None:
    return None if settings.quantize == "none" else settings.quantize


def fill_model_bytes(settings: Settings, path: Path) -> int:
    """Device memory the fill model at `path` takes, wholly resident: weights, KV cache and workspace, as
    its memory plan counts them (from its config.json)."""
    dtype = pick_dtype(pick_device(settings.device), settings.dtype)
    plan, _, _ = plan_from_config(path, dtype, 2**62, quantization(settings), settings.max_batch_size,
                                  max_tokens_per_step=settings.max_tokens_per_step,
                                  kv_int8=settings.kv_cache_dtype == "int8")
    return plan.device_bytes + plan.host_fixed_bytes  # loaded with no limit, its embedding is on the device too


def served_memory_limit(settings: Settings) -> int | None:
    """`memory_limit` covers both models: the served one plans within what the fill model leaves."""
    limit, fill = settings.memory_limit_bytes, fill_model_dir(settings)
    if limit is None or fill is None:
        return limit
    left = limit - fill_model_bytes(settings, fill)
    log.info("memory limit %s: the fill model %s takes %s of it, the served model plans within %s",
             format_bytes(limit), fill.name, format_bytes(limit - left), format_bytes(max(left, 0)))
    if left <= 0:
        raise ValueError(f"memory_limit {format_bytes(limit)} does not even hold the fill model {fill.name} "
                         f"({format_bytes(limit - left)}); raise --memory-limit or pass --fill-model none")
    return left


def make_engine_loop(settings: Settings, load: Callable[[], Engine] | None = None,
                     metrics: Metrics | None = None) -> EngineLoop:
    """The engine loop for `settings`; `load` replaces loading the model the settings name."""
    return EngineLoop(load or engine_loader(settings), metrics or Metrics(), max_batch_size=settings.max_batch_size,
                      max_queue=settings.max_queue, request_timeout=settings.request_timeout)


class Runtime:
    """What the routes share: settings, metrics, the engine loop, and the fill model's loop if there is one."""

    def __init__(self, settings: Settings, engine_loop: EngineLoop, fill_loop: EngineLoop | None = None) -> None:
        self.settings = settings
        self.metrics = engine_loop.metrics
        self.loop = engine_loop
        self.fill_loop = fill_loop
        self.loops = [engine_loop] if fill_loop is None else [engine_loop, fill_loop]
        self.model_name = served_model_name(settings)

    @property
    def engine(self) -> Engine:
        """The loaded engine, or the 503 that says why there is none."""
        return loaded(self.loop)


def loaded(loop: EngineLoop) -> Engine:
    """The engine `loop` runs, or the 503 that says why there is none."""
    loop.check_ready()
    assert loop.engine is not None  # READY implies loaded
    return loop.engine


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


# --- request id, access log and requests_total ------------------------------------------------------


class RequestLogMiddleware:
    """Gives each request an id (`X-Request-Id`, echoed back), counts it, and logs one line when it ends."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log_prompts: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if given.isprintable() and 0 < len(given) <= MAX_REQUEST_ID_CHARS else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state.update(request_id=request_id, start=start)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._record(scope, state, status, time.perf_counter() - start)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, total_s: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(route, str(status)).inc()
        gens: list[Generation] = state.get("generations", [])
        gen = gens[0] if gens else None  # the timings of the first choice (OpenAI's n: the others are alike)
        if gen is not None:
            self.metrics.request_duration.observe(total_s)
        level = logging.INFO if route in ENGINE_ROUTES else logging.DEBUG
        if not log.isEnabledFor(level):
            return

        def since_arrival(t: float | None) -> str:
            return "-" if gen is None or t is None else f"{t - gen.arrival:.4f}"

        error = state.get("error")
        texts = ""
        if self.log_prompts and gen is not None:
            outputs = ["".join(g.output) for g in gens]
            texts = f" prompt={state['tokenizer'].decode(gen.prompt_ids)!r} output=" \
                    f"{outputs[0] if len(outputs) == 1 else outputs!r}"
        finish = ",".join(g.finish_reason or "-" for g in gens) or "-"
        log.log(level, "request id=%s route=%s method=%s status=%d prompt_tokens=%s completion_tokens=%s "
                "finish_reason=%s error=%s queue_s=%s ttft_s=%s total_s=%.4f%s", state["request_id"], route,
                scope["method"], status, gen.num_prompt_tokens if gen else "-",
                sum(g.num_tokens for g in gens) if gens else "-", finish, error or "-",
                since_arrival(gen and gen.scheduled_at), since_arrival(gen and gen.first_token_at), total_s, texts)


# --- auth -------------------------------------------------------------------------------------------

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


# --- the generation path ----------------------------------------------------------------------------


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


# --- routes -----------------------------------------------------------------------------------------

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


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error `statuses`, each with the contract's error body."""
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]} for status in statuses}


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

public = APIRouter()
protected = APIRouter(dependencies=[Depends(require_api_key)], responses=error_responses(401))


@public.get("/health", summary="200 when the engine can serve; 503 while loading, draining, broken, or "
            "degraded for a while after a request failed in the engine", responses=error_responses(503))
async def health(request: Request) -> dict[str, str]:
    for loop in runtime(request).loops:
        loop.check_healthy()
    return {"status": "ok"}


@protected.get("/info", summary="model, device, dtype, quantization, memory plan, limits, version")
async def info(request: Request) -> dict[str, Any]:
    rt = runtime(request)
    s = rt.settings
    engine = rt.loop.engine
    model: dict[str, Any] = {"name": rt.model_name, "path": str(model_dir(s))}
    if engine is not None:
        model.update(type=engine.config.model_type, layers=engine.config.num_layers,
                     vocab_size=engine.config.vocab_size, context=engine.context)
    quantization = engine.config.quantization if engine else None
    return {
        "version": __version__,
        "state": rt.loop.state.value,
        "model": model,
        "device": str(engine.device) if engine else s.device,
        "gpu": engine.probe.as_dict() if engine else None,
        "dtype": str(engine.dtype).removeprefix("torch.") if engine else s.dtype,
        "quantization": {"requested": s.quantize, "active": quantization},
        "lora": [{"path": path, "scale": scale} for path, scale in s.lora_adapters],
        "memory_limit": {"requested": s.memory_limit, "bytes": s.memory_limit_bytes,
                         "active": bool(engine and engine.offload)},
        "offload": offload_info(engine),
        "fill_model": fill_info(s, rt.fill_loop),
        "embeddings": embeddings_info(engine),
        "speculative": {"tokens": s.speculative_tokens, "max_batch": s.speculative_max_batch},
        "limits": {"max_batch_size": s.max_batch_size, "max_tokens_per_step": s.max_tokens_per_step,
                   "max_queue": s.max_queue, "request_timeout": s.request_timeout,
                   "max_body_bytes": s.max_body_bytes},
    }


def embeddings_info(engine: Engine | None) -> dict[str, Any] | None:
    """What /v1/embeddings gives (its pooling and dimensions), or why it gives none; None while loading."""
    if engine is None:
        return None
    try:
        params = engine.embedding_params()
    except UnsupportedTaskError as e:
        return {"available": False, "reason": str(e)}
    return {"available": True, "pooling": params.pooling, "dimensions": engine.config.hidden_size}


def fill_info(settings: Settings, loop: EngineLoop | None) -> dict[str, Any] | None:
    """The model answering /fill_blank when it is not the served one, and the device memory it takes."""
    path = fill_model_dir(settings)
    if loop is None or path is None:
        return None
    engine = loop.engine
    return {"name": path.name, "path": str(path), "state": loop.state.value,
            "type": engine.config.model_type if engine else None, "memory_bytes": fill_model_bytes(settings, path)}


def offload_info(engine: Engine | None) -> dict[str, Any] | None:
    """The memory plan for /info: resident and streamed layers, slots, KV cache, host arena."""
    if engine is None:
        return None
    store = engine.offload
    if store is None:
        return {"resident_layers": list(range(engine.config.num_layers)), "streamed_layers": []}
    snap = store.snapshot()
    return {**store.plan.as_dict(), "host_bytes": snap.host_bytes, "host_pinned_bytes": snap.pinned_bytes}


@protected.get("/metrics", summary="Prometheus exposition", response_class=Response,
               responses=text_response("text/plain", "Prometheus text exposition format 0.0.4"))
async def metrics(request: Request) -> Response:
    body = read_engine_metrics(runtime(request)).render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@protected.get("/stats", response_model=Stats, summary="the gauges and counters of /metrics as JSON")
async def stats(request: Request) -> Stats:
    rt = runtime(request)
    return Stats(time=time.time(), state=rt.loop.state.value, metrics=read_engine_metrics(rt).values())


def read_engine_metrics(rt: Runtime) -> Metrics:
    """The metrics with the series read at scrape time (VRAM, offload, PCIe) brought up to date."""
    engine = rt.loop.engine
    rt.metrics.vram_limit.set(rt.settings.memory_limit_bytes or 0)
    if engine is not None:
        store = engine.offload
        rt.metrics.read_offload(store.snapshot() if store else None, engine.config.num_layers)
        rt.metrics.read_probe(engine.probe)
        rt.metrics.read_device(engine.device)
    return rt.metrics


@protected.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
                responses=GENERATION_RESPONSES,
                summary="continue a prompt; `stream: true` answers with server-sent events")
async def generate(request: Request, body: GenerateRequest) -> Any:
    gen = await start_generation(request, body.prompt, body)
    if body.stream:
        return sse_response(request, _generate_chunks(request, gen))
    done = await collect(request, gen)
    return GenerateResponse(text=done.text, stopped=done.reason in (FinishReason.STOP, FinishReason.EOS),
                            finish_reason=done.reason.value, usage=usage(gen),
                            logprobs=None if body.logprobs is None else generate_logprobs(done.logprobs),
                            prompt_logprobs=None if body.prompt_logprobs is None
                            else generate_logprobs(done.prompt_logprobs))


async def _generate_chunks(request: Request, gen: Generation) -> AsyncIterator[dict[str, Any]]:
    parts = []
    index = 0
    async for out in runtime(request).loop.stream(gen):
        parts.append(out.text)
        if out.prompt_logprobs is not None:
            yield {"prompt_logprobs": generate_logprobs(out.prompt_logprobs)}
        if out.token_id is not None:
            event = {"index": index, "token": {"id": out.token_id, "text": out.text}}
            if out.logprobs is not None:
                event["logprobs"] = generate_logprobs([out.logprobs])[0]
            yield event
            index += 1
        if out.finished:
            yield {"finish_reason": out.finish_reason.value, "text": "".join(parts), "usage": usage(gen)}


@protected.post("/fill_blank", response_model=FillBlankResponse, responses=GENERATION_RESPONSES,
                summary="fill each <span> of the prompt (needs an encoder-decoder or FIM model); `stream: true` "
                        "sends each blank as soon as it is complete")
async def fill_blank(request: Request, body: FillBlankRequest) -> Any:
    rt = runtime(request)
    loop = rt.fill_loop or rt.loop
    engine = loaded(loop)
    try:
        fmt = fill_format(engine.config, engine.tokenizer, engine.eos_ids)
        fill = await run_in_threadpool(partial(FillRequest, fmt, engine.tokenizer, body.prompt,
                                               parse_special=rt.settings.allow_special_tokens))
    except UnsupportedTaskError as e:
        raise ApiError(400, "unsupported_task", str(e)) from None
    except BlankCountError as e:
        raise ApiError(422, "validation_error", f"prompt: {e}") from None
    gen = submit(request, fill.prompt_ids, fill.sampling(await sampling_params(engine, body)), loop)
    chunks = _fill_chunks(loop, gen, fill)
    if body.stream:
        return sse_response(request, chunks)

    async def last() -> dict[str, Any]:  # the whole result
        return [chunk async for chunk in chunks][-1]

    return await unless_disconnected(request, last())


async def _fill_chunks(loop: EngineLoop, gen: Generation, fill: FillRequest) -> AsyncIterator[dict[str, Any]]:
    """`{"index", "position", "text"}` per blank as soon as it is complete, then the whole result."""
    async for out in loop.stream(gen):
        blanks = [] if out.token_id is None else fill.feed(out.token_id)
        if out.finished:
            blanks += fill.finish(gen.params.stop)
        for blank in blanks:
            yield asdict(blank)
        if out.finished:
            yield {"blanks": [asdict(b) for b in fill.blanks], "text": fill.text,
                   "finish_reason": out.finish_reason.value, "usage": usage(gen)}


@protected.post("/tokenize", response_model=TokenizeResponse, responses=TOKENIZER_RESPONSES,
                summary="the served model's token ids for a text, as a prompt would get them")
async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
    ids = await prompt_ids(request, body.prompt, body.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=runtime(request).engine.context)


@protected.post("/detokenize", response_model=DetokenizeResponse, responses=TOKENIZER_RESPONSES,
                summary="the text of token ids of the served model (special tokens left out)")
async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    engine = loaded(runtime(request).loop)
    check_token_ids(engine, body.tokens, "token ids")
    return DetokenizeResponse(prompt=await run_in_threadpool(engine.tokenizer.decode, body.tokens))


@protected.get("/v1/models", summary="OpenAI- and Anthropic-compatible: the served model")
async def list_models(request: Request) -> dict[str, Any]:
    name = runtime(request).model_name
    return {"object": "list", "data": [_model_card(request)], "has_more": False, "first_id": name, "last_id": name}


@protected.get("/v1/models/{model:path}", responses=error_responses(404),
               summary="OpenAI- and Anthropic-compatible: the served model, by its name")
async def retrieve_model(request: Request, model: str) -> dict[str, Any]:
    _check_model(request, model)
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


def _check_model(request: Request, model: str | None) -> None:
    """404 unless `model` (where a body gives one) names the served model."""
    name = runtime(request).model_name
    if model is not None and model != name:
        raise ApiError(404, "model_not_found", f"model {model!r} is not served here; this server serves {name!r}")


@protected.post("/v1/completions", responses=OPENAI_RESPONSES, summary="OpenAI-compatible text completion")
async def completions(request: Request, body: CompletionRequest) -> Any:
    _check_model(request, body.model)
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


@protected.post("/v1/chat/completions", responses=OPENAI_RESPONSES,
                summary="OpenAI-compatible chat completion (the model's chat template)")
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
    _check_model(request, body.model)
    rt = runtime(request)
    params = await chat_params(rt.engine, body)
    tools = body.tool_dicts()
    ids = await _chat_ids(request, body)
    gens = submit_choices(request, [ids], params, body.n)
    head = {"id": f"chatcmpl-{gens[0].request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": rt.model_name}
    mode = body.tool_mode()
    thinking = _thinking(request, ids)
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


def _thinking(request: Request, prompt_ids: list[int]) -> bool | None:
    """Whether the reply to this chat prompt starts inside a thought (`reasoning.opens_in_thought`), or None
    where the server leaves thoughts in the text (`reasoning_format` "none")."""
    if runtime(request).settings.reasoning_format == "none":
        return None
    tail = prompt_ids[-32:]  # "<think>" and some whitespace, even a byte token a character
    return opens_in_thought(runtime(request).engine.tokenizer.decode(tail, skip_special_tokens=False))


async def _chat_ids(request: Request, body: ChatCompletionRequest) -> list[int]:
    """The prompt of a chat request: its messages and tools in the model's chat template."""
    return await run_in_threadpool(partial(
        chat_prompt_ids, runtime(request).engine.tokenizer, [m.for_template() for m in body.messages],
        body.tool_dicts(), body.chat_template_kwargs, add_generation_prompt=body.add_generation_prompt,
        continue_final_message=body.continue_final_message))


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
    ids = await _chat_ids(request, chat)
    gen = submit_choices(request, [ids], params, 1)[0]
    writer = make_writer(gen)
    tools, mode, thinking = chat.tool_dicts(), chat.tool_mode(), _thinking(request, ids)
    if stream:
        return EventSourceResponse(_reply_events(request, gen, writer, tools, mode, thinking), sep="\n",
                                   ping=SSE_PING_S)
    _write_whole(writer, gen, await collect(request, gen), tools, mode, thinking)
    return writer.result()


def _write_whole(writer: ReplyWriter, gen: Generation, done: Collected, tools: list[dict[str, Any]] | None,
                 mode: str | dict[str, Any], thinking: bool | None) -> list[dict[str, str]]:
    """A whole reply written at once, its thought apart (`_thinking`) and its answer read for calls as `mode`
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


@protected.post("/v1/responses", responses=OPENAI_RESPONSES,
                summary="OpenAI-compatible Responses API, stateless (the chat template; nothing is stored)")
async def responses(request: Request, body: ResponsesRequest) -> Any:
    _check_model(request, body.model)
    name = runtime(request).model_name
    return await _serve_reply(request, _chat_of(body.chat_request()), body.stream, lambda gen: ResponseWriter(
        body, f"resp_{gen.request_id}", name, int(time.time())))


@protected.post("/v1/messages", responses=OPENAI_RESPONSES,
                summary="Anthropic-compatible Messages API (the chat template)")
async def messages(request: Request, body: MessagesRequest) -> Any:
    _check_model(request, body.model)
    name = runtime(request).model_name
    return await _serve_reply(request, _chat_of(body.chat_request()), body.stream, lambda gen: MessageWriter(
        f"msg_{gen.request_id}", name, gen.num_prompt_tokens))


@protected.post("/v1/messages/count_tokens", responses=OPENAI_RESPONSES,
                summary="Anthropic-compatible: the tokens of a Messages request's prompt")
async def count_tokens(request: Request, body: CountTokensRequest) -> dict[str, int]:
    _check_model(request, body.model)
    return {"input_tokens": len(await _chat_ids(request, _chat_of(body.chat_request())))}


@protected.post("/v1/embeddings", responses={**OPENAI_RESPONSES, **text_response("application/json", "the embeddings")},
                summary="OpenAI-compatible embeddings: each input's final hidden states, pooled and L2-normalized")
async def embeddings(request: Request, body: EmbeddingRequest) -> Any:
    _check_model(request, body.model)
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


class ReplyReader:
    """A reply read as it streams: its thought apart where `thinking` is not None (`ThoughtSplitter`), and with
    `tools` ("auto") answer text that may be a call held back (`CallWatcher`), the calls read from the whole
    answer at its end."""

    def __init__(self, tools: list[dict[str, Any]] | None, thinking: bool | None) -> None:
        self._tools = tools or []
        self._watcher = None if tools is None else CallWatcher()
        self._splitter = None if thinking is None else ThoughtSplitter(thinking)

    def feed(self, piece: str, last: bool) -> tuple[str, str, list[ToolCall]]:
        """The thought, answer text and calls that `piece` brings out (all that was held back if it is the last)."""
        thought, text, calls = "", piece, []
        if self._splitter is not None:
            thought, text = self._splitter.feed(piece)
            if last:
                more_thought, more_text = self._splitter.finish()
                thought, text = thought + more_thought, text + more_text
        if self._watcher is not None:
            text = self._watcher.feed(text)
            if last:
                rest, calls = self._watcher.finish(self._tools)
                text += rest
        return thought, text, calls


def _chat_choice(index: int, done: Collected, tools: list[dict[str, Any]] | None, mode: str | dict[str, Any],
                 logprobs: bool, thinking: bool | None) -> dict[str, Any]:
    """One chat choice from its generation: its thought apart where `thinking` is not None (`_thinking`), the
    tool calls in the answer read as `mode` asks (`tools.read_calls`)."""
    thought, text = (None, done.text) if thinking is None else split_thought(done.text, thinking)
    content, calls = (text, []) if tools is None else read_calls(text, tools, mode)
    message: dict[str, Any] = {"role": "assistant", "content": content}
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


# --- the app ----------------------------------------------------------------------------------------


def create_app(settings: Settings, engine_loop: EngineLoop | None = None) -> FastAPI:
    """The daemon's ASGI app. The models load on engine threads at startup; until then routes answer 503.

    `engine_loop` defaults to one that loads the model the settings name (tests pass their own); a second
    loop serves /fill_blank when the settings name a fill model.
    """
    engine_loop = engine_loop or make_engine_loop(settings)
    fill_dir = fill_model_dir(settings)
    fill_loop = None if fill_dir is None else make_engine_loop(settings, engine_loader(settings, fill_dir),
                                                               engine_loop.metrics)
    rt = Runtime(settings, engine_loop, fill_loop)
    engine_loop.metrics.watch(rt.loops)
    # sse-starlette would end every stream on the first SIGTERM (a process-wide flag); our drain lets
    # running streams finish, then ends the stragglers itself.
    AppStatus.disable_automatic_graceful_drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for loop in rt.loops:
            loop.start(asyncio.get_running_loop())
        yield
        await asyncio.gather(*(loop.stop() for loop in rt.loops))

    app = FastAPI(title="vramlite", version=__version__, lifespan=lifespan,
                  description="Run big language models on one small GPU. Errors always have the body "
                              '`{"error": {"type", "message"}}` (under /v1/messages Anthropic\'s, which adds '
                              '`"type": "error"` and names its types).')
    app.state.runtime = rt
    install_error_handlers(app)
    app.add_middleware(RequestLimitsMiddleware, max_header_bytes=settings.max_header_bytes,
                       max_body_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-Api-Key", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id", "Retry-After"])
    app.add_middleware(RequestLogMiddleware, metrics=engine_loop.metrics,  # outermost: it sees every status
                       log_prompts=settings.log_prompts)
    app.include_router(public)
    app.include_router(protected)
    install_playground(app)
    return app

