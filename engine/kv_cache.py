"""The KV cache: one preallocated tensor pair holding a batch of sequences of different lengths.

Each running sequence owns one slot (a row of the cache) for its whole life;
its keys and values for position p live at [layer, slot, :, p]. Slots are
handed out lowest-first so a batch tends to occupy a contiguous range, which
attention reads as a view instead of a gather.

An encoder-decoder model also keeps a cross cache: each decoder layer's keys
and values of the slot's encoder output, written once when the sequence's
encoder runs and read by every decode step after.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    """Keys and values [layers, slots, kv_heads, context, head_dim] plus a slot allocator.

    With `cross_context` > 0, also `cross_k` / `cross_v` [layers, slots, kv_heads, cross_context, head_dim]
    and `cross_lens`, the encoder length each slot holds (0: none yet).
    """

    def __init__(self, num_layers: int, num_slots: int, context: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, cross_context: int = 0) -> None:
        shape = (num_layers, num_slots, num_kv_heads, context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.cross_k: torch.Tensor | None = None
        self.cross_v: torch.Tensor | None = None
        if cross_context:
            cross_shape = (num_layers, num_slots, num_kv_heads, cross_context, head_dim)
            self.cross_k = torch.zeros(cross_shape, dtype=dtype, device=device)
            self.cross_v = torch.zeros(cross_shape, dtype=dtype, device=device)
        self.cross_lens = [0] * num_slots
        self.num_slots = num_slots
        self.context = context
        self._free = list(range(num_slots))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        cross = 0 if self.cross_k is None else self.cross_k.nbytes + self.cross_v.nbytes
        return self.k.nbytes + self.v.nbytes + cross

    def allocate(self) -> int:
        """Take the lowest free slot; raises RuntimeError when all are taken."""
        if not self._free:
            raise RuntimeError("KV cache has no free slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        """Give a slot back; its stale contents are masked out until overwritten."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.cross_lens[slot] = 0
        heapq.heappush(self._free, slot)
