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

A sliding-window layer (Mistral, Gemma 2 and 3, ...) whose window is shorter
than the context keeps a ring instead (Mistral's rolling buffer): position p
at p mod R, R being the window plus a step's longest prefill chunk less one, as
much as any query of that chunk can still see (`cache_lengths`). The prefix
cache then reuses a slot only where its ring still holds what the new
sequence's queries will look back to.

With `int8` (`--kv-cache-dtype int8`), keys and values are stored as int8 with
one scale per position and head (symmetric absmax over the head's dimensions,
as llama.cpp's q8_0 cache and vLLM's int8 KV do per block): about half the
memory of a 16-bit cache, dequantized to the compute dtype where attention reads
them (`Int8Cache`).

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
from typing import Any

import torch


class KVCache:
    """Keys and values, per layer [slots, kv_heads, context, head_dim], plus a slot allocator.

    With `cross_context` > 0, also `cross_k` / `cross_v`, per layer [slots, kv_heads, cross_context, head_dim],
    and `cross_lens`, the encoder length each slot holds (0: none yet).
    """

    def __init__(self, num_layers: int, num_slots: int, context: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, cross_context: int = 0,
                 windows: Sequence[int | None] = (), max_chunk: int | None = None, int8: bool = False) -> None:
        def layers(lengths: Sequence[int]) -> list[torch.Tensor]:
            return [torch.zeros((num_slots, num_kv_heads, n, head_dim), dtype=dtype, device=device) for n in lengths]

        def int8_layers(lengths: Sequence[int]) -> list[Int8Cache]:
            return [Int8Cache((num_slots, num_kv_heads, n, head_dim), dtype, device) for n in lengths]

        self.lengths = cache_lengths(windows or [None] * num_layers, context, max_chunk)
        self.int8 = int8
        make = int8_layers if int8 else layers
        self.k: list[torch.Tensor] | list[Int8Cache] = make(self.lengths)
        self.v: list[torch.Tensor] | list[Int8Cache] = make(self.lengths)
        # how many of a freed sequence's last positions a reuse may leave behind, where rings overwrite the rest
        self._reuse_slack = max_chunk - 1 if max_chunk and min(self.lengths) < context else None
        self.cross_k: list[torch.Tensor] | None = None
        self.cross_v: list[torch.Tensor] | None = None
        if cross_context:
            self.cross_k, self.cross_v = layers([cross_context] * num_layers), layers([cross_context] * num_layers)
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
            n = self._reusable(held, len(held), token_ids, limit)
            if n > reused:
                slot, reused = held_slot, n
        source, copied = None, reused
        for running_slot, (tokens, computed) in (running or {}).items():
            n = self._reusable(tokens, computed, token_ids, min(computed, limit))
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
                end = copied if layer.shape[2] == self.context else None  # a ring: all of it
                layer[slot, :, :end] = layer[source, :, :end]
            reused = copied
        return slot, reused

    def _reusable(self, held: Sequence[int], computed: int, token_ids: Sequence[int], limit: int) -> int:
        """How many first positions of a slot that computed `computed` tokens of `held` serve `token_ids`: their
        common prefix, or none where a ring has overwritten positions the new sequence will look back to."""
        n = _common_prefix(held, token_ids, limit)
        return 0 if self._reuse_slack is not None and computed - n > self._reuse_slack else n

    def free(self, slot: int, computed: Sequence[int] = ()) -> None:
        """Give a slot back, with the tokens whose keys and values it holds from position 0 (`computed`: for
        `allocate` to reuse; none: nothing reusable). Its stale contents are masked out until overwritten."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.cross_lens[slot] = 0
        heapq.heappush(self._free, slot)
        if computed:
            self._held[slot] = list(computed)


class Int8Cache:
    """One layer's keys or values in int8, a scale per slot, head and position: indexed like the tensor
    [slots, kv_heads, positions, head_dim] of the compute dtype it stands for (assigning quantizes, reading
    dequantizes)."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.data = torch.zeros(shape, dtype=torch.int8, device=device)
        self.scale = torch.zeros((*shape[:3], 1), dtype=dtype, device=device)
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scale.nbytes

    def __setitem__(self, index: Any, value: torch.Tensor) -> None:
        amax = value.abs().amax(dim=-1, keepdim=True).float()
        scale = (amax / 127).clamp(min=torch.finfo(self.dtype).tiny)
        self.data[index] = (value.float() / scale).round().clamp(-127, 127).to(torch.int8)
        self.scale[index] = scale.to(self.dtype)

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.data[index].to(self.dtype) * self.scale[index]


def cache_lengths(windows: Sequence[int | None], context: int, max_chunk: int | None) -> list[int]:
    """Positions each layer's cache holds: the context, or for a sliding-window layer a ring of its window plus
    the longest prefill chunk (`max_chunk`, a step's token budget) less one, where that is shorter. None: no
    rings (chunks of any length)."""
    if max_chunk is None:
        return [context] * len(windows)
    return [context if w is None else min(context, w + max_chunk - 1) for w in windows]


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many first items a and b share, at most `limit`."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if n >= limit or x != y:
            break
        n += 1
    return n
