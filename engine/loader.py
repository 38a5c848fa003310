"""Loading a model from a local HF-format directory."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from engine.config import ModelConfig, read_json
from engine.errors import ModelLoadError
from engine.layers.linear import QUANTIZATIONS
from engine.models import family
from engine.models.base import CausalLM
from engine.weights import CheckpointReader

log = logging.getLogger(__name__)

INT8_METHOD = "vramlite-int8"  # config.json quantization_config.quant_method of our int8 checkpoints


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, context: int | None = None,
               quantize: str | None = None) -> tuple[CausalLM, int]:
    """Build the model of `model_dir` on `device` in `dtype`; returns it and its context length.

    `context` caps the positions the KV cache will hold (default: the model's
    maximum; a sliding-window model is capped at its window). `quantize="int8"`
    quantizes the decoder blocks' linear layers as they load; an int8
    checkpoint (written by `vramlite quantize`) loads as int8 whatever it says.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    raw = read_json(model_dir / "config.json")
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
    if cfg.sliding_window:
        limit = min(limit, cfg.sliding_window)
    if context is None:
        context = limit
    elif context > limit:
        raise ValueError(f"context {context} exceeds the model's limit of {limit} positions")
    with torch.device("meta"):
        model = cls(cfg)
    with CheckpointReader(model_dir) as reader:
        model.load_weights(reader, device, dtype)
    model.setup(context, device, dtype)
    model.eval()
    log.info("loaded %s (%s, %d layers, %.1f MiB of weights%s) on %s in %s, context %d", model_dir.name,
             cfg.model_type, cfg.num_layers, weight_bytes(model) / 2**20, ", int8" if quantize else "", device,
             str(dtype).removeprefix("torch."), context)
    return model, context


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers (int8 weights and their scales included), shared ones once."""
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.nbytes for t in tensors.values())
