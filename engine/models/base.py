"""What every model family provides to the runner, and the weight-assignment helper they share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.attention import AttentionMetadata
from engine.weights import CheckpointReader


class CausalLM(nn.Module, ABC):
    """A decoder stack over a packed batch: `forward` gives hidden states, `compute_logits` the scores.

    Families are built on the `meta` device and filled by `load_weights`, so a
    model's parameters exist once, already in their final dtype and device.
    """

    config: ModelConfig

    @staticmethod
    @abstractmethod
    def parse_config(raw: dict[str, Any]) -> ModelConfig:
        """Normalize an HF config.json of this family."""

    @abstractmethod
    def load_weights(self, reader: CheckpointReader, device: torch.device, dtype: torch.dtype) -> None:
        """Read every parameter from the checkpoint (names as HF writes them), checking shapes."""

    @abstractmethod
    def setup(self, context: int, device: torch.device, dtype: torch.dtype) -> None:
        """Build non-parameter state (position tables) for a cache of `context` positions."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Hidden states [N, hidden] for packed tokens [N]; cache is (k, v) [layers, slots, ...]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [B, hidden] → [B, vocab]."""


def assign(module: nn.Module, name: str, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
    """Replace parameter `name` of `module` (on meta) by `tensor`, cast and moved."""
    setattr(module, name, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
