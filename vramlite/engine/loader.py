"""Loading a model from a local HF-format directory."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vramlite.engine.config import ModelConfig, parse_size, read_json
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.kv_cache import cache_lengths
from vramlite.engine.layers.linear import QUANTIZATIONS
from vramlite.engine.lora import AdaptedReader, LoraAdapter
from vramlite.engine.models import family
from vramlite.engine.models.base import CausalLM, keep
from vramlite.engine.offload import (
    OffloadPlan,
    WeightStore,
    format_bytes,
    layer_sizes,
    min_budget,
    plan_offload,
    tensor_bytes,
)
from vramlite.engine.weights import CheckpointReader

log = logging.getLogger(__name__)

INT8_METHOD = "vramlite-int8"  # config.json quantization_config.quant_method of our int8 checkpoints


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, context: int | None = None,
               quantize: str | None = None, memory_limit: int | str | None = None, max_batch_size: int = 1,
               max_tokens_per_step: int = 512, prefetch_depth: int = 1, h2d_bandwidth: float = 0.0,
               kv_int8: bool = False, lora: Sequence[tuple[str | Path, float]] = ()) -> tuple[CausalLM, int]:
    """Build the model of `model_dir` on `device` in `dtype`; returns it and its context length.

    `context` caps the positions the KV cache will hold (default: the model's
    maximum, or under `memory_limit` the most that fits, if fewer). `quantize="int8"`
    quantizes the decoder blocks' linear layers as they load; an int8
    checkpoint (written by `vramlite quantize`) loads as int8 whatever it says.

    `memory_limit` (bytes, or a size such as "5GiB") caps the device memory of
    the weights, a KV cache of `max_batch_size` × context and the activations of
    `max_tokens_per_step` tokens: the layers that do not fit are loaded into
    host memory and streamed, `prefetch_depth` layers ahead (`model.offload`
    holds the plan and its accounting; `h2d_bandwidth`, the probed host-to-device
    bytes/s, gives the plan's expected decode time). ValueError if even
    streaming every layer does not fit. None: everything on the device, no
    offload machinery.

    `lora`: (PEFT adapter directory, scale) pairs merged into the weights as they
    are read, before quantization (see `vramlite.engine.lora`).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    asked = context
    model, context = meta_model(read_json(model_dir / "config.json"), quantize, context)
    quantize = model.config.quantization
    cfg = model.config
    reader = checkpoint_reader(model_dir, lora)
    place, host = keep, ()
    if memory_limit is not None:
        plan, context = plan_within(model, dtype, parse_size(memory_limit), max_batch_size, context, asked is None,
                                    max_tokens_per_step, prefetch_depth, model.head_shares_embedding(reader),
                                    h2d_bandwidth, kv_int8=kv_int8)
        model.offload = WeightStore(model.blocks(), plan, dtype, device, cycle_from=model.step_start())
        place = model.offload.place
        host = (model.input_embeddings(),) if plan.host_fixed_bytes else ()
    model.load_weights(reader, device, dtype, place, host)
    loaded_bytes = weight_bytes(model)  # before streamed layers share their slots' memory
    if model.offload is not None:
        model.offload.start()
    model.setup(context, device, dtype)
    model.eval()
    log.info("loaded %s (%s, %d layers, %.1f MiB of weights%s) on %s in %s, context %d", model_dir.name,
             cfg.model_type, cfg.num_layers, loaded_bytes / 2**20, ", int8" if quantize else "", device,
             str(dtype).removeprefix("torch."), context)
    return model, context


def checkpoint_reader(model_dir: Path, lora: Sequence[tuple[str | Path, float]] = ()) -> CheckpointReader:
    """The reader of `model_dir`'s tensors, with the `lora` adapters (directory, scale) merged in."""
    if not lora:
        return CheckpointReader(model_dir)
    adapters = [LoraAdapter.load(path, scale) for path, scale in lora]
    for adapter in adapters:
        log.info("LoRA adapter %s at scale %g: %d weights updated, %d replaced", adapter.path, adapter.scale,
                 len(adapter.updates), len(adapter.replacements))
    return AdaptedReader(model_dir, adapters)


MIN_FITTED_CONTEXT = 256  # a context chosen to fit a memory limit is at least this long, or the load fails


def largest_fitting_context(plan_for: Callable[[int], OffloadPlan], longest: int) -> int | None:
    """The longest context below `longest` whose plan fits (bisection: KV cache and workspace grow with it),
    None if not even MIN_FITTED_CONTEXT positions (or `longest`, if shorter) fit."""
    def fits(positions: int) -> bool:
        try:
            plan_for(positions)
        except ValueError:
            return False
        return True

    low, high = min(MIN_FITTED_CONTEXT, longest), longest  # fits(low) is to be seen; fits(high) is False
    if not fits(low):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (int8 weights and their scales included), shared ones once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.nbytes for t in tensors.values())


def meta_model(raw: dict[str, Any], quantize: str | None = None, context: int | None = None
               ) -> tuple[CausalLM, int]:
    """The model a parsed config.json describes, built on `meta` (no memory), and its context length (see
    `load_model` for `quantize` and `context`)."""
    cls = family(raw.get("model_type"))
    cfg: ModelConfig = cls.parse_config(raw)
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)} or None")
    stored = (raw.get("quantization_config") or {}).get("quant_method")
    if stored == INT8_METHOD:
        quantize = "int8"
    elif stored is not None:
        raise ModelLoadError(f"config.json: quantization {stored!r} is not supported (only {INT8_METHOD!r})")
    cfg = dataclasses.replace(cfg, quantization=quantize)
    limit = cfg.max_position_embeddings
    if context is None:
        context = limit
    elif context > limit:
        raise ValueError(f"context {context} exceeds the model's limit of {limit} positions")
    with torch.device("meta"):
        return cls(cfg), context


def plan_from_config(config: str | Path, dtype: torch.dtype, memory_limit: int | str, quantize: str | None = None,
                     max_batch_size: int = 1, context: int | None = None, max_tokens_per_step: int = 512,
                     prefetch_depth: int = 1, h2d_bandwidth: float = 0.0, kv_int8: bool = False
                     ) -> tuple[OffloadPlan, ModelConfig, int]:
    """The memory plan `load_model` would make, from a model's config.json alone (a file, or the directory
    holding it): sizes come from the shapes, so no weights are needed. Returns the plan, the parsed config and
    the context. The LM head counts as tied when config.json says so (a checkpoint is not there to ask); an int8 head
is its own copy even then."""
    path = Path(config)
    asked = context
    model, context = meta_model(read_json(path / "config.json" if path.is_dir() else path), quantize, context)
    plan, context = plan_within(model, dtype, parse_size(memory_limit), max_batch_size, context, asked is None,
                                max_tokens_per_step, prefetch_depth,
                                model.config.tie_word_embeddings and not model.config.quantization, h2d_bandwidth,
                                kv_int8=kv_int8)
    return plan, model.config, context


def plan_within(model: CausalLM, dtype: torch.dtype, memory_limit: int, max_batch_size: int, context: int,
                shorten: bool, max_tokens_per_step: int, prefetch_depth: int, shared_head: bool,
                h2d_bandwidth: float = 0.0, *, kv_int8: bool = False) -> tuple[OffloadPlan, int]:
    """`plan_model` at `context`, and the context planned. Where that does not fit: with `shorten` (the context
    is the model's maximum, not one asked for), at the longest context that fits, with a warning; else
    ValueError, naming the longest context that fits if one does."""
    def plan_for(positions: int) -> OffloadPlan:
        return plan_model(model, dtype, memory_limit, max_batch_size, positions, max_tokens_per_step,
                          prefetch_depth, shared_head, h2d_bandwidth, kv_int8=kv_int8)

    try:
        return plan_for(context), context
    except ValueError as e:
        fits = largest_fitting_context(plan_for, context)
        if fits is None:
            raise
        if not shorten:
            raise ValueError(f"{e}; a context of {fits} positions fits") from None
        log.warning("context %d: the most positions the memory limit leaves room for (the model allows %d; "
                    "--context sets it, --memory-limit or a smaller --max-batch-size makes room)", fits, context)
        return plan_for(fits), fits


def plan_model(model: CausalLM, dtype: torch.dtype, memory_limit: int, max_batch_size: int, context: int,
               max_tokens_per_step: int, prefetch_depth: int, shared_head: bool, h2d_bandwidth: float = 0.0, *,
               kv_int8: bool = False) -> OffloadPlan:
    """Plan `model` (on `meta`) into `memory_limit`: weights, a KV cache of `max_batch_size` × `context` (int8
    with `kv_int8`), the activations of `max_tokens_per_step` tokens; `shared_head`: the LM head is the
    embedding's very tensor."""
    cfg = model.config
    layers = model.blocks()
    # An embedding the head does not share stays in host memory; a shared one is the head's weight, on the device.
    host = [] if shared_head else [model.input_embeddings()]
    fixed = tensor_bytes(model, dtype, [*layers, model.lm_head] if shared_head else [*layers, *host])
    host_bytes = sum(tensor_bytes(m, dtype) for m in host)
    sizes = layer_sizes(layers, dtype)

    def activations(batch: int) -> tuple[int, int]:
        return (kv_cache_bytes(cfg, batch, context, dtype, max_tokens_per_step, kv_int8),
                workspace_bytes(cfg, batch, context, max_tokens_per_step, dtype))

    try:
        return plan_offload(sizes, fixed, *activations(max_batch_size), memory_limit, prefetch_depth, h2d_bandwidth,
                            host_bytes)
    except ValueError as e:
        if max_batch_size == 1:
            raise
        one = min_budget(sizes, fixed, *activations(1), prefetch_depth)
        raise ValueError(f"{e} (with max_batch_size=1 it takes {format_bytes(one)})") from None


def kv_cache_bytes(cfg: ModelConfig, max_batch_size: int, context: int, dtype: torch.dtype,
                   max_tokens_per_step: int | None = None, kv_int8: bool = False) -> int:
    """What `KVCache` allocates for `max_batch_size` sequences of `context` positions (an encoder-decoder's
    cross cache included; sliding-window layers' rings, given the step budget; with `kv_int8`, one byte a
    value and a `dtype` scale per position and head)."""
    # An encoder-decoder has a self-attention and a cross-attention cache; CPM-Ant's prompt tokens come first.
    if cfg.is_encoder_decoder:
        self_positions = cross_positions = context * cfg.num_layers
    else:
        windows = cfg.layer_windows or [None] * cfg.num_layers
        self_positions = sum(cache_lengths(windows, context + cfg.cache_prefix, max_tokens_per_step))
        cross_positions = 0
    per_position = cfg.head_dim * dtype.itemsize  # a head's values at one position
    self_per_position = cfg.head_dim + dtype.itemsize if kv_int8 else per_position
    return 2 * max_batch_size * cfg.num_kv_heads * (self_positions * self_per_position
                                                    + cross_positions * per_position)


def workspace_bytes(cfg: ModelConfig, max_batch_size: int, context: int, max_tokens_per_step: int,
                    dtype: torch.dtype) -> int:
    """An upper estimate of one step's activations: per-token tensors of a layer (residual, norm, attention
    and MLP outputs, qkv, gate/up and the activation), a prefill chunk's fp32 attention scores when attention
    is not fused, and the fp32 logits of the batch with, for prompt log-probabilities, a block of as many
    rows (in the model's dtype, fp32, and their log-softmax) beside them. A prompt that attends both ways
    (CPM-Ant) and an encoder input run whole even past `max_tokens_per_step`, beside the other sequences'
    decodes; each CPM-Ant prompt has its `cache_prefix` prompt tokens in front."""
    tokens = max_tokens_per_step
    if cfg.whole_prompt or cfg.is_encoder_decoder:
        tokens = max(tokens, context + max_batch_size - 1)
    tokens += max_batch_size * cfg.cache_prefix
    positions = context + cfg.cache_prefix
    per_token = 4 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim \
        + 3 * cfg.intermediate_size
    scores = 4 * cfg.num_heads * min(tokens, positions) * positions
    logits = 4 * 4 * max_batch_size * cfg.vocab_size
    return tokens * per_token * dtype.itemsize + scores + logits
