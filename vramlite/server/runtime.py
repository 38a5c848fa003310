"""The daemon's runtime: the engine loops the settings ask for, and what routes read of them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import Request

from vramlite import models as demo_models
from vramlite.engine import Engine
from vramlite.engine.device import pick_device, pick_dtype
from vramlite.engine.loader import plan_from_config
from vramlite.engine.offload.planner import format_bytes
from vramlite.server.engine_loop import EngineLoop
from vramlite.server.metrics import Metrics
from vramlite.server.settings import Settings

log = logging.getLogger("vramlite.server")


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
