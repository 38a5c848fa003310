"""The KV cache: one preallocated tensor pair holding a batch of sequences of different lengths.

Each running sequence owns one slot (a row of the cache) for its whole life;
its keys and values for position p live at [layer, slot, :, p]. Slots are
handed out lowest-first so a batch tends to occupy a contiguous range, which
attention reads as a view instead of a gather.
"""

from __future__ import annotations

import heapq

import torch


class KVCache:
    """Keys and values [layers, slots, kv_heads, context, head_dim] plus a slot allocator."""

    def __init__(self, num_layers: int, num_slots: int, context: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_slots, num_kv_heads, context, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_slots = num_slots
        self.context = context
        self._free = list(range(num_slots))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def allocate(self) -> int:
        """Take the lowest free slot; raises RuntimeError when all are taken."""
        if not self._free:
            raise RuntimeError("KV cache has no free slot")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        """Give a slot back; its stale contents are masked out until overwritten."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        heapq.heappush(self._free, slot)
