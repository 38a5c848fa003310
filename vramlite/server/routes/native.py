"""vramlite's own routes: /generate, /fill_blank, /tokenize, /detokenize."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from vramlite.engine import FinishReason
from vramlite.engine.errors import UnsupportedTaskError
from vramlite.engine.fill_blank import BlankCountError, FillRequest, fill_format
from vramlite.server.engine_loop import EngineLoop, Generation
from vramlite.server.errors import ApiError
from vramlite.server.logprobs import generate_logprobs
from vramlite.server.runtime import loaded, runtime
from vramlite.server.schemas import (
    DetokenizeRequest,
    DetokenizeResponse,
    FillBlankRequest,
    FillBlankResponse,
    GenerateRequest,
    GenerateResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from vramlite.server.serving import (
    GENERATION_RESPONSES,
    TOKENIZER_RESPONSES,
    check_token_ids,
    collect,
    prompt_ids,
    protected_router,
    sampling_params,
    sse_response,
    start_generation,
    submit,
    unless_disconnected,
    usage,
)

router = protected_router()


@router.post("/generate", response_model=GenerateResponse, response_model_exclude_none=True,
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


@router.post("/fill_blank", response_model=FillBlankResponse, responses=GENERATION_RESPONSES,
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


@router.post("/tokenize", response_model=TokenizeResponse, responses=TOKENIZER_RESPONSES,
                summary="the served model's token ids for a text, as a prompt would get them")
async def tokenize(request: Request, body: TokenizeRequest) -> TokenizeResponse:
    ids = await prompt_ids(request, body.prompt, body.add_special_tokens)
    return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=runtime(request).engine.context)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=TOKENIZER_RESPONSES,
                summary="the text of token ids of the served model (special tokens left out)")
async def detokenize(request: Request, body: DetokenizeRequest) -> DetokenizeResponse:
    engine = loaded(runtime(request).loop)
    check_token_ids(engine, body.tokens, "token ids")
    return DetokenizeResponse(prompt=await run_in_threadpool(engine.tokenizer.decode, body.tokens))
