"""The layer streamer: swap slots on the device and the copy schedule that fills them ahead of compute.

Streamed layer j (its rank among the streamed layers, in forward order)
always lives in slot `j % num_slots`, so its parameters are bound once, as
static views into that slot. Around each layer the model calls `before(i)`
and `after(i)`:

- `before(i)` makes sure the slot holds layer i (loading it now on a cold
  start), fills the slots ahead, and makes compute wait for i's copy
  (copy-before-use);
- `after(i)` marks the end of i's compute and refills the slot i used with
  the layer `prefetch_depth + 1` streamed places ahead, ordered after that
  mark (use-before-slot-reuse). The order is cyclic: after the last streamed
  layer come the first ones of the next step, so the next forward pass's
  first copies overlap this one's tail. A step starts at layer `cycle_from`:
  an encoder-decoder model's decode steps run its decoder layers alone, and
  its encoder layers load when a step encodes.

A slot whose occupant has not been used yet is never refilled; `before`
reloads a slot that holds the wrong layer (a pass that stopped half-way, or
layers run out of order), so the schedule recovers from either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vramlite.engine.offload.arena import HostArena
from vramlite.engine.offload.copies import CopyEngine
from vramlite.engine.offload.stats import OffloadStats


class LayerStreamer:
    """Streams `layers[i]` for i in `streamed` through `num_slots` device slots (see the module docstring)."""

    def __init__(self, layers: Sequence[nn.Module], streamed: Sequence[int], arena: HostArena, num_slots: int,
                 prefetch_depth: int, device: torch.device, copies: CopyEngine, stats: OffloadStats,
                 cycle_from: int = 0) -> None:
        if not 1 <= num_slots <= len(streamed) or num_slots < min(prefetch_depth + 1, len(streamed)):
            raise ValueError(f"{num_slots} slots cannot stream {len(streamed)} layers {prefetch_depth} ahead")
        if len(arena.layouts) != len(streamed):
            raise ValueError(f"the arena holds {len(arena.layouts)} layers, {len(streamed)} are streamed")
        self.streamed = tuple(streamed)
        self.num_slots = num_slots
        self.prefetch_depth = prefetch_depth
        self.arena = arena
        self.copies = copies
        self.stats = stats
        self._rank = {layer: j for j, layer in enumerate(self.streamed)}
        # the streamed rank a step's copies start from (past the end: no step starts with a streamed layer)
        self._wrap = next((j for j, layer in enumerate(self.streamed) if layer >= cycle_from), len(self.streamed))
        slot_bytes = max(layout.nbytes for layout in arena.layouts)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self._holds: list[int | None] = [None] * num_slots  # streamed rank loaded (or loading) in each slot
        self._used = [True] * num_slots  # the occupant has run (or there is none): the slot may be refilled
        self._freed: list[Any] = [None] * num_slots  # marker: compute of the last occupant that ran
        self._ready: list[Any] = [None] * num_slots  # marker: the occupant's copy
        self._layers = [layers[i] for i in self.streamed]
        for j, layer in enumerate(self._layers):
            arena.layouts[j].bind(layer, self.slots[j % num_slots])

    def slot_of(self, layer: int) -> int | None:
        """The slot a streamed layer runs from; None for a resident one."""
        j = self._rank.get(layer)
        return None if j is None else j % self.num_slots

    def before(self, layer: int) -> None:
        """Layer `layer` is about to run: its weights must be in its slot before its compute starts."""
        j = self._rank.get(layer)
        if j is None:
            return
        self.copies.poll()
        s = j % self.num_slots
        if self._holds[s] != j:
            self._load(j)
        self._prefetch(j + 1, self.prefetch_depth)
        self.copies.wait(self._ready[s])

    def after(self, layer: int) -> None:
        """Layer `layer`'s compute is queued: its slot may be refilled once that compute is done."""
        j = self._rank.get(layer)
        if j is None:
            return
        s = j % self.num_slots
        self._freed[s] = self.copies.mark()
        self._used[s] = True
        self._prefetch(j + 1, self.prefetch_depth + 1)

    def _prefetch(self, start: int, count: int) -> None:
        """Queue the copies of streamed ranks start, start+1, ... (after the last, the next step's first), in
        order, while slots allow."""
        n, j = len(self.streamed), start
        for _ in range(min(count, n)):
            if j >= n:
                if self._wrap >= n:
                    return
                j = self._wrap
            s = j % self.num_slots
            if self._holds[s] != j:
                if not self._used[s]:
                    return
                self._load(j)
            j += 1

    def _load(self, j: int) -> None:
        s = j % self.num_slots
        src = self.arena.region(j)
        self._ready[s] = self.copies.copy(self.slots[s][: src.numel()], src, self._freed[s])
        self._holds[s] = j
        self._used[s] = False
        self.stats.record_issue(src.nbytes)
