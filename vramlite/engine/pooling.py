"""Embeddings: a prompt's final hidden states pooled into one L2-normalized vector.

A prompt is prefilled in chunks, so each chunk's hidden states are reduced as they are computed (`reduce`,
during the forward pass) and the parts added up per sequence (`Pooler`). The pooling method is the model's
own where its directory says (sentence-transformers' `1_Pooling/config.json`), else the last token's, as
decoder-only embedding models (E5-Mistral, GTE-Qwen2) and vLLM's default for them pool.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

POOLING_METHODS = ("last", "mean", "first")
"""last: the last prompt token's hidden state; mean: the mean over every prompt token (BOS included, as
sentence-transformers' attention mask counts it); first: the first token's (CLS pooling)."""

# sentence-transformers' pooling config keys → our methods
_SENTENCE_TRANSFORMERS = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean",
                          "pooling_mode_cls_token": "first"}


def model_pooling(model_dir: str | Path) -> str:
    """The pooling a model directory asks for: sentence-transformers' `1_Pooling/config.json` where there is
    one, else "last". ValueError for a pooling that is not one of POOLING_METHODS (max, weighted mean)."""
    path = Path(model_dir) / "1_Pooling" / "config.json"
    if not path.is_file():
        return "last"
    config = json.loads(path.read_text(encoding="utf-8"))
    modes = [key for key, on in config.items() if key.startswith("pooling_mode_") and on is True]
    if len(modes) != 1 or modes[0] not in _SENTENCE_TRANSFORMERS:
        raise ValueError(f"{path}: pooling {', '.join(modes) or 'none'} is not supported; give one of "
                         f"{', '.join(POOLING_METHODS)} instead")
    return _SENTENCE_TRANSFORMERS[modes[0]]


def reduce(method: str, first: int, length: int, hidden: torch.Tensor) -> torch.Tensor | None:
    """One chunk's part of a pooled embedding, fp32 [hidden], or None if it has none: `hidden` [n, hidden]
    holds the final hidden states of prompt tokens first .. first + n - 1 of a prompt of `length` tokens."""
    if method == "mean":
        return hidden.float().sum(dim=0)
    at = 0 if method == "first" else length - 1
    return hidden[at - first].float() if first <= at < first + len(hidden) else None


class Pooler:
    """One prompt's embedding, from the parts `reduce` gives of its chunks."""

    def __init__(self, method: str, length: int) -> None:
        if method not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_METHODS)}, got {method!r}")
        self.method = method
        self.length = length
        self._total: torch.Tensor | None = None

    @property
    def needs_every_token(self) -> bool:
        """Whether every prompt token must be computed (mean, first), or only the last (which a prompt that
        starts like a cached one may leave to the cache)."""
        return self.method != "last"

    def add(self, part: torch.Tensor | None) -> None:
        if part is not None:
            self._total = part if self._total is None else self._total + part

    def embedding(self) -> list[float]:
        """The L2-normalized embedding, once every chunk's part is in."""
        if self._total is None:
            raise RuntimeError("no hidden states were pooled")
        total = self._total / self.length if self.method == "mean" else self._total
        return torch.nn.functional.normalize(total, dim=0).tolist()
