"""The weight store: a model's decoder layers placed by an `OffloadPlan` — resident on the device, or in the
host arena and streamed through swap slots — plus the sizes the planner needs and the accounting it keeps."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from vramlite.engine.offload.arena import HostArena, host_register
from vramlite.engine.offload.copies import CudaCopies, SyncCopies
from vramlite.engine.offload.layout import LayerLayout
from vramlite.engine.offload.planner import OffloadPlan
from vramlite.engine.offload.stats import OffloadStats, StatsSnapshot
from vramlite.engine.offload.streamer import LayerStreamer

log = logging.getLogger(__name__)


def layer_sizes(layers: Sequence[nn.Module], dtype: torch.dtype) -> list[int]:
    """Each layer's bytes once loaded (aligned as in a slot); the layers may still be on `meta`."""
    return [LayerLayout.of(layer, dtype).nbytes for layer in layers]


def tensor_bytes(module: nn.Module, dtype: torch.dtype, skip: Sequence[nn.Module] = ()) -> int:
    """Bytes of `module`'s tensors once loaded, leaving out those of the modules in `skip`."""
    return LayerLayout.of(module, dtype).tensor_bytes - sum(LayerLayout.of(m, dtype).tensor_bytes for m in skip)


class WeightStore:
    """Where each decoder layer's weights live, per `plan`; streamed layers are filled through `place`.

    Loading: every loaded tensor goes through `place(module, name, tensor)`,
    which copies a streamed layer's tensor into the host arena (returning its
    arena view) and passes any other through. `start()` then binds the
    streamed layers to their device slots and creates the `streamer` the
    model's forward loop calls around each layer. A plan that streams nothing
    makes no arena and no streamer.
    """

    def __init__(self, layers: Sequence[nn.Module], plan: OffloadPlan, dtype: torch.dtype,
                 device: torch.device, cycle_from: int = 0) -> None:
        if len(layers) != plan.num_layers:
            raise ValueError(f"the plan is for {plan.num_layers} layers, the model has {len(layers)}")
        self.layers = layers
        self.plan = plan
        self.device = device
        self.cycle_from = cycle_from  # the first layer of every forward pass (see LayerStreamer)
        self.streamer: LayerStreamer | None = None
        self.arena: HostArena | None = None
        if plan.streamed:
            layouts = [LayerLayout.of(layers[i], dtype) for i in plan.streamed]
            self.arena = HostArena(layouts, host_register(device))
        arena_bytes = self.arena.nbytes if self.arena else 0
        self.stats = OffloadStats(len(plan.resident), len(plan.streamed), arena_bytes,
                                  pinned=self.arena is not None and self.arena.pinned,
                                  pin_refused=self.arena is not None and self.arena.pin_refused)
        self._owner = {id(module): (j, path) for j, i in enumerate(plan.streamed)
                       for path, module in layers[i].named_modules()}
        for line in plan.describe():
            log.info("%s", line)
        if self.arena is not None:
            log.info("host arena %.1f MiB (%s)", arena_bytes / 2**20, "pinned" if self.arena.pinned else "pageable")

    def place(self, module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Where `module.name` should point once loaded: `tensor`, or its copy in the arena if streamed."""
        owner = self._owner.get(id(module))
        if owner is None or self.arena is None:
            return tensor
        j, path = owner
        layout = self.arena.layouts[j]
        entry = layout.find(path, name)
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise ValueError(f"layer {self.plan.streamed[j]} {path}.{name}: loaded {tensor.dtype} "
                             f"{tuple(tensor.shape)}, planned {entry.dtype} {entry.shape}")
        view = layout.view(self.arena.region(j), entry)
        view.copy_(tensor)
        return view

    def snapshot(self) -> StatsSnapshot:
        """The accounting so far, with the copies and waits finished since the last layer ran (an idle engine's
        last prefetches too)."""
        if self.streamer is not None:
            self.streamer.copies.poll()
        return self.stats.snapshot()

    def start(self) -> None:
        """Move the streamed layers onto their slots; from now on the streamer runs the copies."""
        if self.arena is None:
            return
        copies = CudaCopies(self.device, self.stats) if self.device.type == "cuda" else SyncCopies(self.stats)
        self.streamer = LayerStreamer(self.layers, self.plan.streamed, self.arena, self.plan.num_slots,
                                      self.plan.prefetch_depth, self.device, copies, self.stats, self.cycle_from)
