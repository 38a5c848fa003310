"""T5's relative position bias: query-key distances binned into buckets, one learned scalar per bucket and head."""

from __future__ import annotations

import math

import torch
from torch import nn

from vramlite.engine.layers.embedding import Embedding


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each `key_position - query_position` (as transformers' T5 computes it).

    Half the buckets (per direction when `bidirectional`) hold exact small
    distances, the rest grow logarithmically up to `max_distance`; a causal
    (not bidirectional) bias maps every key after the query to bucket 0.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -relative_position.clamp(max=0)
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """The bias [heads, queries, keys] for given query and key positions."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.embedding = Embedding(num_buckets, num_heads)
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        relative = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return self.embedding(buckets).permute(2, 0, 1)
