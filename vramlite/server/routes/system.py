"""Routes about the server: /health, /info, /metrics, /stats."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from vramlite import __version__
from vramlite.engine import Engine
from vramlite.engine.errors import UnsupportedTaskError
from vramlite.server.engine_loop import EngineLoop
from vramlite.server.metrics import Metrics
from vramlite.server.runtime import Runtime, fill_model_bytes, fill_model_dir, model_dir, runtime
from vramlite.server.schemas import Stats
from vramlite.server.serving import error_responses, protected_router, text_response
from vramlite.server.settings import Settings

public = APIRouter()
router = protected_router()


@public.get("/health", summary="200 when the engine can serve; 503 while loading, draining, broken, or "
            "degraded for a while after a request failed in the engine", responses=error_responses(503))
async def health(request: Request) -> dict[str, str]:
    for loop in runtime(request).loops:
        loop.check_healthy()
    return {"status": "ok"}


@router.get("/info", summary="model, device, dtype, quantization, memory plan, limits, version")
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


@router.get("/metrics", summary="Prometheus exposition", response_class=Response,
               responses=text_response("text/plain", "Prometheus text exposition format 0.0.4"))
async def metrics(request: Request) -> Response:
    body = read_engine_metrics(runtime(request)).render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/stats", response_model=Stats, summary="the gauges and counters of /metrics as JSON")
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
