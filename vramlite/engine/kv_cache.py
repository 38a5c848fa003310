"""The KV cache: a preallocated key and value tensor per layer, each holding a batch of sequences of different
lengths.

Each running sequence owns one slot (a row of the cache) for its whole life;
its keys and values for position p live at k[layer][slot, :, p]. Slots are
handed out lowest-first so a batch tends to occupy a contiguous range, which
attention reads as a view instead of a gather.

A freed slot keeps the keys and values of the tokens its sequence computed
(prefix caching, as llama.cpp's server keeps a slot's prompt): a new prompt
that starts with the same tokens takes that slot and skips computing them (a
chat's next turn resends the whole conversation). A prompt that starts like a
running sequence (requests sharing a system prompt) copies those keys and
values into its own slot: a copy of a few MiB, where computing them again
runs the whole model. A prompt that matches none takes a slot that holds
nothing, else the one freed longest ago.

One tensor per layer rather than one for all layers: a step compiled by
torch.compile writes a layer's cache in place only when it is a tensor of its
own (into a view of a bigger one, Inductor copied the layer's whole cache
twice a step: a 130M LLaMA's compiled decode step took 31 ms instead of 18).

An encoder-decoder model also keeps a cross cache: each decoder layer's keys
and values of the slot's encoder output, written once when the sequence's
encoder runs and read by every decode step after.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

import torch


class KVCache:
    """Keys and values, per layer [slots, kv_heads, context, head_dim], plus a slot allocator.

    With `cross_context` > 0, also `cross_k` / `cross_v`, per layer [slots, kv_heads, cross_context, head_dim],
    and `cross_lens`, the encoder length each slot holds (0: none yet).
    """

    def __init__(self, num_layers: int, num_slots: int, context: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, cross_context: int = 0) -> None:
        def layers(length: int) -> list[torch.Tensor]:
            shape = (num_slots, num_kv_heads, length, head_dim)
            return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

        self.k, self.v = layers(context), layers(context)
        self.cross_k: list[torch.Tensor] | None = None
        self.cross_v: list[torch.Tensor] | None = None
        if cross_context:
            self.cross_k, self.cross_v = layers(cross_context), layers(cross_context)
        self.cross_lens = [0] * num_slots
        self.num_slots = num_slots
        self.context = context
        self._free = list(range(num_slots))
        self._held: dict[int, list[int]] = {}  # free slot -> the tokens whose K/V it still holds, oldest first

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        tensors = [*self.k, *self.v, *(self.cross_k or ()), *(self.cross_v or ())]
        return sum(t.nbytes for t in tensors)

    def allocate(self, token_ids: Sequence[int] = (),
                 running: Mapping[int, tuple[Sequence[int], int]] | None = None) -> tuple[int, int]:
        """Take a free slot for a sequence of `token_ids` (none: no reuse) and say how many of its first
        positions already hold their keys and values, at most all but the last token (whose logits the caller
        needs). The free slot holding the longest prefix of `token_ids` is taken; where a taken slot holds a
        longer one (`running`: slot -> its sequence's tokens and how many of them it has computed), those keys
        and values are copied into the lowest slot holding nothing, else the one freed longest ago, which is
        also the choice when nothing matches. Raises RuntimeError when all are taken."""
        if not self._free:
            raise RuntimeError("KV cache has no free slot")
        limit = len(token_ids) - 1
        slot, reused = None, 0
        for held_slot, held in self._held.items():
            n = _common_prefix(held, token_ids, limit)
            if n > reused:
                slot, reused = held_slot, n
        source, copied = None, reused
        for running_slot, (tokens, computed) in (running or {}).items():
            n = _common_prefix(tokens, token_ids, min(computed, limit))
            if n > copied:
                source, copied = running_slot, n
        if source is not None or slot is None:
            empty = [s for s in self._free if s not in self._held]
            slot = min(empty) if empty else next(iter(self._held))
            reused = 0
        self._free.remove(slot)
        heapq.heapify(self._free)
        self._held.pop(slot, None)
        if source is not None:
            for layer in (*self.k, *self.v):
                layer[slot, :, :copied] = layer[source, :, :copied]
            reused = copied
        return slot, reused

    def free(self, slot: int, computed: Sequence[int] = ()) -> None:
        """Give a slot back, with the tokens whose keys and values it holds from position 0 (`computed`: for
        `allocate` to reuse; none: nothing reusable). Its stale contents are masked out until overwritten."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.cross_lens[slot] = 0
        heapq.heappush(self._free, slot)
        if computed:
            self._held[slot] = list(computed)


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many first items a and b share, at most `limit`."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n
