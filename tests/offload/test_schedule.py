"""The copy schedule on a simulated copy stream and clock: order, slot reuse, prefetch depth, overlap."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from vramlite.engine.offload.arena import HostArena
from vramlite.engine.offload.layout import LayerLayout
from vramlite.engine.offload.planner import spread
from vramlite.engine.offload.stats import OffloadStats
from vramlite.engine.offload.streamer import LayerStreamer


class Block(nn.Module):
    """A layer with a parameter and an int8 buffer, both filled with values unique to the layer."""

    def __init__(self, i: int) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.register_buffer("codes", torch.full((5,), i, dtype=torch.int8))
        with torch.no_grad():
            self.proj.weight.fill_(i)
            self.proj.bias.fill_(-i)

    def check(self, i: int) -> None:
        assert torch.all(self.proj.weight == i) and torch.all(self.proj.bias == -i) and torch.all(self.codes == i)


@dataclass
class Op:
    kind: str  # "copy" or "compute"
    rank: int
    slot: int
    start: float
    end: float


@dataclass
class SimCopies:
    """A copy stream and a compute stream on a simulated clock; copies happen eagerly, times are simulated."""

    copy_time: float
    stats: OffloadStats
    compute_clock: float = 0.0
    copy_clock: float = 0.0
    ops: list[Op] = field(default_factory=list)
    streamer: LayerStreamer | None = None

    def mark(self) -> float:
        return self.compute_clock

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: float | None) -> float:
        start = max(self.copy_clock, after or 0.0)
        self.copy_clock = start + self.copy_time
        dst.copy_(src)
        slot = next(s for s, t in enumerate(self.streamer.slots) if t.data_ptr() == dst.data_ptr())
        rank = next(j for j in range(len(self.streamer.streamed))
                    if self.streamer.arena.region(j).data_ptr() == src.data_ptr())
        self.ops.append(Op("copy", rank, slot, start, self.copy_clock))
        self.stats.record_copy(src.nbytes, self.copy_time)
        return self.copy_clock

    def wait(self, ready: float) -> None:
        stall = max(0.0, ready - self.compute_clock)
        self.compute_clock += stall
        self.stats.record_stall(stall)

    def poll(self) -> None:
        pass

    def compute(self, layer: int, duration: float) -> None:
        start, self.compute_clock = self.compute_clock, self.compute_clock + duration
        rank = self.streamer.streamed.index(layer) if layer in self.streamer.streamed else -1
        self.ops.append(Op("compute", rank, self.streamer.slot_of(layer) if rank >= 0 else -1, start,
                           self.compute_clock))


def make(num_layers: int, streamed: tuple[int, ...], depth: int, copy_time: float = 1.0,
         num_slots: int | None = None, cycle_from: int = 0) -> tuple[nn.ModuleList, LayerStreamer, SimCopies]:
    layers = nn.ModuleList(Block(i) for i in range(num_layers))
    layouts = [LayerLayout.of(layers[i], torch.float32) for i in streamed]
    arena = HostArena(layouts)
    for j, i in enumerate(streamed):
        for entry in layouts[j].entries:
            layouts[j].view(arena.region(j), entry).copy_(getattr(layers[i].get_submodule(entry.module), entry.name))
    stats = OffloadStats(num_layers - len(streamed), len(streamed), arena.nbytes)
    sim = SimCopies(copy_time, stats)
    slots = num_slots or min(depth + 1, len(streamed))
    sim.streamer = LayerStreamer(layers, streamed, arena, slots, depth, torch.device("cpu"), sim, stats, cycle_from)
    return layers, sim.streamer, sim


def run_steps(layers: nn.ModuleList, streamer: LayerStreamer, sim: SimCopies, steps: int,
              compute_time: float = 0.3, first: int = 0) -> list[float]:
    """Forward passes as a family's loop makes them, from layer `first` on; returns each step's start time on
    the compute clock."""
    starts = []
    for _ in range(steps):
        starts.append(sim.compute_clock)
        for i, layer in enumerate(layers):
            if i < first:
                continue
            streamer.before(i)
            layer.check(i)
            sim.compute(i, compute_time)
            streamer.after(i)
    starts.append(sim.compute_clock)
    return starts


def check_slot_safety(ops: list[Op]) -> None:
    """Copy-before-use and use-before-reuse: the last copy into a slot starting before a compute on it
    ends is the copy of that very layer, and it ended before the compute began."""
    copies = [op for op in ops if op.kind == "copy"]
    for c in (op for op in ops if op.kind == "compute" and op.rank >= 0):
        into_slot = [op for op in copies if op.slot == c.slot and op.start < c.end]
        last = max(into_slot, key=lambda op: op.start)
        assert last.rank == c.rank, f"slot {c.slot} was refilled with rank {last.rank} while rank {c.rank} ran"
        assert last.end <= c.start, f"rank {c.rank} ran before its copy finished"


CASES = [(8, 4, 1), (8, 4, 2), (8, 5, 1), (8, 6, 2), (12, 12, 1), (12, 7, 3), (6, 3, 1), (5, 3, 2)]


@pytest.mark.parametrize(("num_layers", "num_streamed", "depth"), CASES)
def test_copies_run_in_cyclic_order_and_slots_are_reused_safely(num_layers, num_streamed, depth):
    streamed = spread(num_layers, num_streamed)
    layers, streamer, sim = make(num_layers, streamed, depth)
    run_steps(layers, streamer, sim, steps=4)
    check_slot_safety(sim.ops)
    order = [op.rank for op in sim.ops if op.kind == "copy"]
    n, slots = num_streamed, streamer.num_slots
    # A rank alone in its slot (rank j uses slot j % slots) is copied once and stays; the others cycle.
    shared = {j for j in range(n) if sum(k % slots == j % slots for k in range(n)) > 1}
    assert order[:n] == list(range(n))
    cyclic = [k % n for k in range(n, 6 * n) if k % n in shared]
    assert order[n:] == cyclic[: len(order) - n]
    assert 3 * len(shared) <= len(order) - n <= 3 * len(shared) + depth + 1


@pytest.mark.parametrize(("num_layers", "num_streamed", "depth"), CASES)
def test_prefetch_depth_is_respected_and_used(num_layers, num_streamed, depth):
    streamed = spread(num_layers, num_streamed)
    layers, streamer, sim = make(num_layers, streamed, depth)
    run_steps(layers, streamer, sim, steps=3)
    copied, computed = 0, 0  # copies issued / streamed computes done so far, in program order
    for op in sim.ops:
        if op.kind == "copy":
            copied += 1
        elif op.rank >= 0:
            ahead = copied - computed - 1  # copies issued beyond the layer now running
            assert ahead <= depth
            cycling = num_streamed > streamer.num_slots and num_streamed % streamer.num_slots == 0
            if computed >= num_streamed and cycling:  # steady state: the prefetch is full
                assert ahead == min(depth, num_streamed - 1)
            computed += 1


def test_copy_bound_steps_keep_the_copy_engine_busy():
    # 8 layers, 4 streamed, copies 1.0 vs compute 0.3: the ideal step is 4 copies = 4.0.
    layers, streamer, sim = make(8, spread(8, 4), depth=1)
    starts = run_steps(layers, streamer, sim, steps=5)
    steady = [b - a for a, b in itertools.pairwise(starts[2:])]
    assert all(s == pytest.approx(4.0) for s in steady), steady
    snap = sim.stats.snapshot()
    assert snap.h2d_bytes == snap.num_copies * streamer.arena.layouts[0].nbytes
    assert snap.h2d_bandwidth == pytest.approx(streamer.arena.layouts[0].nbytes / 1.0)
    assert snap.stall_seconds > 0


def test_spreading_streamed_layers_beats_streaming_the_last_ones():
    def step_time(streamed: tuple[int, ...]) -> float:
        layers, streamer, sim = make(16, streamed, depth=1, copy_time=1.0)
        starts = run_steps(layers, streamer, sim, steps=4, compute_time=0.4)
        return starts[-1] - starts[-2]

    spread_time, last_time = step_time(spread(16, 8)), step_time(tuple(range(8, 16)))
    assert spread_time == pytest.approx(8.0)  # copy-bound: never idle
    assert last_time > spread_time


@pytest.mark.parametrize(("streamed", "depth"), [(tuple(range(8)), 1), ((1, 3, 5, 7), 1), ((0, 2, 4, 5, 6), 2)])
def test_decode_steps_of_an_encoder_decoder_copy_its_decoder_layers_alone(streamed, depth):
    """Layers 0-3 encode, 4-7 decode: a step that encodes runs all eight, a decode step the last four. Once
    the encoding step is done, every copy is of a decoder layer, each one once a step, all prefetched."""
    layers, streamer, sim = make(8, streamed, depth, cycle_from=4)
    run_steps(layers, streamer, sim, steps=1)
    done = len(sim.ops)
    starts = run_steps(layers, streamer, sim, steps=4, first=4)
    check_slot_safety(sim.ops)
    decoder = [j for j, i in enumerate(streamed) if i >= 4]
    copies = [op.rank for op in sim.ops[done:] if op.kind == "copy"]
    cycling = [j for j in decoder if sum(k % streamer.num_slots == j % streamer.num_slots for k in decoder) > 1]
    assert set(copies) <= set(cycling) and len(copies) <= 4 * len(cycling)
    steady = [b - a for a, b in itertools.pairwise(starts[1:])]
    assert all(s == pytest.approx(steady[0]) for s in steady)  # no step pays for a load on demand


def test_a_pass_stopped_half_way_does_not_break_the_next():
    layers, streamer, sim = make(8, spread(8, 5), depth=2)
    run_steps(layers, streamer, sim, steps=1)
    for i in range(4):  # an exception in layer 3's compute: no after(3)
        streamer.before(i)
        sim.compute(i, 0.3)
        if i < 3:
            streamer.after(i)
    run_steps(layers, streamer, sim, steps=2)
    check_slot_safety(sim.ops)


def test_out_of_order_layers_still_get_their_weights():
    layers, streamer, sim = make(6, (0, 2, 4), depth=1)
    for i in (4, 0, 2, 2, 4, 0):
        streamer.before(i)
        layers[i].check(i)
        sim.compute(i, 0.3)
        streamer.after(i)
    check_slot_safety(sim.ops)


def test_too_few_slots_for_the_depth_is_refused():
    with pytest.raises(ValueError, match="slots"):
        make(8, spread(8, 4), depth=2, num_slots=2)
