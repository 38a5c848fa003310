"""The VRAM budget planner: which decoder layers stay resident and which are streamed (no torch here).

Budget = fixed weights (embeddings, head, final norm) + KV cache + activation
workspace + resident layers + swap slots (an input embedding the LM head does
not share stays in host memory instead: `host_fixed_bytes`); a streamed layer is copied from the
host arena into slot `j % num_slots` (j = its rank among streamed layers) just
before it runs, so the slots must each hold the largest streamed layer.

Which layers stay resident. With `n` streamed layers and prefetch depth `d`,
the copy of streamed layer j+d can only start once streamed layer j-1 has
finished computing (it reuses that slot). On a small GPU a layer's copy takes
much longer than its compute, so the step is bound by the copy engine, and
what matters is that it never idles. It idles when a long run of resident
layers computes while all slots are already full: with the "last n layers"
choice the whole resident head of the model runs with only `d` copies in
flight, and the copies of the rest then serialize with compute. Spreading the
streamed layers evenly between the resident ones (Bresenham-style, centred)
keeps every run of resident layers as short as possible — each resident layer
computes while a copy is in flight — and, with the streamer prefetching across
the step boundary, the first streamed layers of the next step load during the
last layers, the LM head and sampling of the current one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def format_bytes(n: int) -> str:
    """`n` in the largest binary unit that keeps it ≥ 1 (`5.00 GiB`, `12.0 MiB`, `300 B`)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def spread(num_layers: int, num_streamed: int) -> tuple[int, ...]:
    """Indices of `num_streamed` of `num_layers` layers, spaced as evenly as possible and centred."""
    if not 0 <= num_streamed <= num_layers:
        raise ValueError(f"cannot stream {num_streamed} of {num_layers} layers")
    return tuple((2 * j + 1) * num_layers // (2 * num_streamed) for j in range(num_streamed))


@dataclass(frozen=True)
class OffloadPlan:
    """How a model's weights share a VRAM budget (all sizes in bytes)."""

    memory_limit: int
    layer_bytes: tuple[int, ...]
    fixed_bytes: int
    kv_bytes: int
    workspace_bytes: int
    prefetch_depth: int
    streamed: tuple[int, ...]
    num_slots: int
    slot_bytes: int
    h2d_bytes_per_second: float = 0.0  # the measured (or assumed) pinned host-to-device bandwidth; 0 = unknown
    host_fixed_bytes: int = 0  # the input embedding, kept in host memory (a decode step copies one row a token)

    @property
    def num_layers(self) -> int:
        return len(self.layer_bytes)

    @property
    def resident(self) -> tuple[int, ...]:
        streamed = set(self.streamed)
        return tuple(i for i in range(self.num_layers) if i not in streamed)

    @property
    def resident_bytes(self) -> int:
        return sum(self.layer_bytes[i] for i in self.resident)

    @property
    def streamed_bytes(self) -> int:
        """What each forward pass copies host to device."""
        return sum(self.layer_bytes[i] for i in self.streamed)

    @property
    def host_bytes(self) -> int:
        """The host arena: every streamed layer, laid out as in its slot."""
        return self.streamed_bytes

    @property
    def decode_seconds(self) -> float | None:
        """Lower bound on a decode step: the streamed bytes at the host-to-device bandwidth (None if unknown).

        One step gives every running sequence a token, so the bound on tokens/s is batch / decode_seconds.
        """
        if not self.streamed:
            return 0.0
        return self.streamed_bytes / self.h2d_bytes_per_second if self.h2d_bytes_per_second > 0 else None

    @property
    def device_bytes(self) -> int:
        """The planned VRAM total, ≤ memory_limit."""
        return (self.fixed_bytes + self.kv_bytes + self.workspace_bytes + self.resident_bytes
                + self.num_slots * self.slot_bytes)

    def describe(self) -> list[str]:
        """Lines for the startup log."""
        lines = [f"memory limit {format_bytes(self.memory_limit)}, planned {format_bytes(self.device_bytes)}: "
                 f"weights outside the layers {format_bytes(self.fixed_bytes)}, KV cache {format_bytes(self.kv_bytes)},"
                 f" workspace {format_bytes(self.workspace_bytes)}",
                 f"{len(self.resident)} of {self.num_layers} layers resident ({format_bytes(self.resident_bytes)})"]
        if self.streamed:
            lines.append(f"{len(self.streamed)} layers streamed from host memory ({format_bytes(self.streamed_bytes)}"
                         f" per step): {', '.join(map(str, self.streamed))}")
            lines.append(f"{self.num_slots} swap slots of {format_bytes(self.slot_bytes)}, "
                         f"prefetch depth {self.prefetch_depth}")
            lines.append(self.describe_decode_bound())
        return lines

    def describe_decode_bound(self) -> str:
        """The expected decode time per token from the streamed bytes and the host-to-device bandwidth."""
        seconds = self.decode_seconds
        if seconds is None:
            return "expected decode time per token: unknown (no host-to-device bandwidth measured)"
        return (f"expected decode time per token ≥ {seconds * 1e3:.1f} ms = {format_bytes(self.streamed_bytes)} "
                f"streamed / {self.h2d_bytes_per_second / 1e9:.2f} GB/s host to device "
                f"(≤ {1 / seconds:.2f} tokens/s per sequence; a batch shares each copy)")

    def as_dict(self) -> dict[str, Any]:
        """The plan for `/info`."""
        return {"memory_limit_bytes": self.memory_limit, "planned_bytes": self.device_bytes,
                "fixed_bytes": self.fixed_bytes, "kv_cache_bytes": self.kv_bytes,
                "workspace_bytes": self.workspace_bytes, "resident_layers": list(self.resident),
                "streamed_layers": list(self.streamed), "resident_bytes": self.resident_bytes,
                "streamed_bytes_per_step": self.streamed_bytes, "num_slots": self.num_slots,
                "slot_bytes": self.slot_bytes, "prefetch_depth": self.prefetch_depth,
                "h2d_bytes_per_second": self.h2d_bytes_per_second, "decode_seconds_bound": self.decode_seconds,
                "host_embedding_bytes": self.host_fixed_bytes}


def plan_table(plan: OffloadPlan, max_batch_size: int = 1) -> list[str]:
    """The plan as an aligned table: what takes VRAM, what lives in host memory, and the decode bound of the
    host-to-device copies (`max_batch_size` sequences share each step's copies)."""
    def layers(indices: Sequence[int]) -> str:
        return ", ".join(map(str, indices)) if indices else "-"

    seconds = plan.decode_seconds
    rows = [
        ("VRAM budget", plan.memory_limit, f"planned {format_bytes(plan.device_bytes)}"),
        ("weights outside the layers", plan.fixed_bytes,
         "final norm, LM head" + ("" if plan.host_fixed_bytes else ", embeddings")),
        ("KV cache", plan.kv_bytes, f"for a batch of {max_batch_size}"),
        ("workspace", plan.workspace_bytes, "activations of one step"),
        ("resident layers", plan.resident_bytes, f"{len(plan.resident)} of {plan.num_layers}: {layers(plan.resident)}"),
        ("swap slots", plan.num_slots * plan.slot_bytes,
         f"{plan.num_slots} × {format_bytes(plan.slot_bytes)}, prefetch depth {plan.prefetch_depth}"),
        ("streamed layers", plan.streamed_bytes,
         f"{len(plan.streamed)} of {plan.num_layers}, copied every step: {layers(plan.streamed)}"),
        ("host pinned", plan.host_bytes, "one arena holding the streamed layers"),
    ]
    if plan.host_fixed_bytes:
        rows.append(("host embedding", plan.host_fixed_bytes, "the input embedding: rows are looked up on the host"))
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{name:<{width}}  {format_bytes(nbytes):>11}  {detail}" for name, nbytes, detail in rows]
    if plan.h2d_bytes_per_second > 0:
        lines.append(f"{'host→device':<{width}}  {plan.h2d_bytes_per_second / 1e9:>7.2f} GB/s")
    if seconds is None:
        bound = "unknown: no host-to-device bandwidth (measure on a GPU, or give one)"
    elif seconds == 0:
        bound = "not bound by copies: nothing is streamed"
    else:
        bound = (f"{seconds * 1e3:.1f} ms per step = {1 / seconds:.2f} tokens/s per sequence, "
                 f"{max_batch_size / seconds:.2f} tokens/s for a batch of {max_batch_size}")
    lines.append(f"{'decode bound':<{width}}  {bound}")
    return lines


def plan_offload(layer_bytes: Sequence[int], fixed_bytes: int, kv_bytes: int, workspace_bytes: int,
                 memory_limit: int, prefetch_depth: int = 1, h2d_bytes_per_second: float = 0.0,
                 host_fixed_bytes: int = 0) -> OffloadPlan:
    """The plan keeping the most layers resident within `memory_limit`; `h2d_bytes_per_second` (the probed
    pinned bandwidth, 0 = unknown) gives its expected decode time per token.

    Raises ValueError naming the smallest budget that works when none does.
    The resident count is monotone in the budget: each count has one fixed
    layout and cost, and the plan takes the largest count whose cost fits.
    """
    if not layer_bytes:
        raise ValueError("a model to offload needs at least one layer")
    if prefetch_depth < 1:
        raise ValueError(f"prefetch_depth must be ≥ 1, got {prefetch_depth}")
    if min(layer_bytes) < 0 or min(fixed_bytes, kv_bytes, workspace_bytes) < 0:
        raise ValueError("byte sizes must be ≥ 0")
    plans = [_layout(layer_bytes, fixed_bytes, kv_bytes, workspace_bytes, memory_limit, prefetch_depth, n,
                     h2d_bytes_per_second, host_fixed_bytes) for n in range(len(layer_bytes) + 1)]
    for plan in plans:  # fewest streamed layers first
        if plan.device_bytes <= memory_limit:
            return plan
    smallest = min(plans, key=lambda p: p.device_bytes)
    raise ValueError(
        f"memory_limit {format_bytes(memory_limit)} is too small: the smallest budget that works is "
        f"{format_bytes(smallest.device_bytes)} = {smallest.device_bytes} bytes ({smallest.num_slots} swap slots of "
        f"{format_bytes(smallest.slot_bytes)}, KV cache {format_bytes(kv_bytes)}, workspace "
        f"{format_bytes(workspace_bytes)}, weights outside the layers {format_bytes(fixed_bytes)}); raise "
        f"memory_limit, or shrink the KV cache with a smaller max_batch_size or context"
    )


def min_budget(layer_bytes: Sequence[int], fixed_bytes: int, kv_bytes: int, workspace_bytes: int,
               prefetch_depth: int = 1) -> int:
    """The smallest memory_limit `plan_offload` accepts."""
    return min(_layout(layer_bytes, fixed_bytes, kv_bytes, workspace_bytes, 0, prefetch_depth, n).device_bytes
               for n in range(len(layer_bytes) + 1))


def _layout(layer_bytes: Sequence[int], fixed_bytes: int, kv_bytes: int, workspace_bytes: int, memory_limit: int,
            prefetch_depth: int, num_streamed: int, h2d_bytes_per_second: float = 0.0,
            host_fixed_bytes: int = 0) -> OffloadPlan:
    streamed = spread(len(layer_bytes), num_streamed)
    return OffloadPlan(
        memory_limit=memory_limit, layer_bytes=tuple(layer_bytes), fixed_bytes=fixed_bytes, kv_bytes=kv_bytes,
        workspace_bytes=workspace_bytes, prefetch_depth=prefetch_depth, streamed=streamed,
        # one slot per layer in flight: the computing one and `prefetch_depth` ahead (never more than streamed)
        num_slots=min(prefetch_depth + 1, num_streamed),
        slot_bytes=max((layer_bytes[i] for i in streamed), default=0),
        h2d_bytes_per_second=h2d_bytes_per_second, host_fixed_bytes=host_fixed_bytes,
    )
