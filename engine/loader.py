"""Loading a model from a local HF-format directory."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from engine.config import ModelConfig, read_json
from engine.errors import ModelLoadError
from engine.models import family
from engine.models.base import CausalLM
from engine.weights import CheckpointReader

log = logging.getLogger(__name__)


def load_model(model_dir: str | Path, device: torch.device, dtype: torch.dtype, context: int | None = None
               ) -> tuple[CausalLM, int]:
    """Build the model of `model_dir` on `device` in `dtype`; returns it and its context length.

    `context` caps the positions the KV cache will hold (default: the model's
    maximum; a sliding-window model is capped at its window).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    raw = read_json(model_dir / "config.json")
    cls = family(raw.get("model_type"))
    cfg: ModelConfig = cls.parse_config(raw)
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
    log.info("loaded %s (%s, %d layers, %.1f M parameters) on %s in %s, context %d", model_dir.name,
             cfg.model_type, cfg.num_layers, sum(p.numel() for p in model.parameters()) / 1e6, device,
             str(dtype).removeprefix("torch."), context)
    return model, context
