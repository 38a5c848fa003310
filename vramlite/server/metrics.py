"""Prometheus series of DESIGN.md ("Metrics"), on a registry of their own per app.

Load series are fed by the engine threads and the request middleware. VRAM series are read from
torch's CUDA allocator at scrape time, PCIe and offload series from the engine's offload stats
(they read 0 without a memory limit or a GPU, so dashboards never miss a series).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from vramlite.engine.gpu_probe import GpuProbe
from vramlite.engine.offload import StatsSnapshot

if TYPE_CHECKING:
    from vramlite.server.engine_loop import EngineLoop

PREFIX = "vramlite"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every vramlite series, registered on `self.registry`."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=PREFIX, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, namespace=PREFIX, registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, namespace=PREFIX, registry=r, buckets=buckets)

        # PCIe and offload (the counters' names lose `_total` here: prometheus-client adds it).
        self.pcie_h2d_bytes = counter("pcie_h2d_bytes", "Bytes copied host to device for streamed weights.")
        self.pcie_d2h_bytes = counter("pcie_d2h_bytes", "Bytes copied device to host.")
        self.pcie_h2d_bandwidth = gauge("pcie_h2d_bandwidth_bytes_per_second",
                                        "Host-to-device copy bandwidth over a recent window.")
        self.offload_stall_seconds = counter("offload_stall_seconds", "Time compute waited for streamed weights.")
        # The device as probed at engine start (0 on a CPU).
        self.gpu_info = gauge("gpu_info", "1 for the GPU the engine runs on (0 for a CPU), by name and capability.",
                              ("name", "compute_capability"))
        self.pcie_link_generation = gauge("pcie_link_generation", "PCIe generation the GPU and host can link at.")
        self.pcie_link_width = gauge("pcie_link_width", "PCIe lanes the GPU and host can link with.")
        self.pcie_h2d_probe = gauge("pcie_h2d_probe_bytes_per_second",
                                    "Pinned host-to-device bandwidth measured at engine start.")
        # VRAM and KV cache.
        self.vram_used = gauge("vram_used_bytes", "Device memory held by tensors.")
        self.vram_reserved = gauge("vram_reserved_bytes", "Device memory reserved by the caching allocator.")
        self.vram_total = gauge("vram_total_bytes", "Device memory of the GPU.")
        self.vram_limit = gauge("vram_limit_bytes", "The configured VRAM budget (0 = none).")
        self.kv_cache_usage = gauge("kv_cache_usage_ratio", "Fraction of KV-cache sequence slots in use.")
        self.resident_layers = gauge("offload_resident_layers", "Layers whose weights stay in VRAM.")
        self.streamed_layers = gauge("offload_streamed_layers", "Layers streamed from host memory each step.")
        self.host_pinned = gauge("host_pinned_bytes", "Pinned host memory holding streamed layers.")
        self.host_pinned_fallback = gauge("host_pinned_fallback", "1 when pinning was refused and the streamed "
                                          "layers are copied from pageable host memory (slower).")
        # Load.
        self.requests_running = gauge("requests_running", "Requests in the running batch.")
        self.requests_waiting = gauge("requests_waiting", "Requests admitted and waiting for a batch slot.")
        self.requests = counter("requests", "HTTP requests by route and status.", ("route", "status"))
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first generated token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of one request.")
        self.request_duration = histogram("request_duration_seconds", "Arrival to the end of a generation reply.")
        self.queue_time = histogram("queue_time_seconds", "Arrival to joining the running batch.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of requests that joined a batch.")
        self.prefix_cache_hit_tokens = counter("prefix_cache_hit_tokens", "Prompt tokens whose keys and values "
                                               "a freed cache slot still held: not computed again.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.speculative_draft_tokens = counter("speculative_draft_tokens", "Tokens drafted by prompt lookup "
                                                "and checked in a forward pass.")
        self.speculative_accepted_tokens = counter("speculative_accepted_tokens", "Drafted tokens the model "
                                                   "agreed with: generated without a step of their own.")
        self.engine_faults = counter("engine_faults", "Requests ended by an error in the engine's forward pass.")
        self._last_offload: StatsSnapshot | None = None
        self.batch_size = histogram("batch_size", "Sequences that got a token from the same forward pass.",
                                    BATCH_BUCKETS)

    def watch(self, loops: Sequence[EngineLoop]) -> None:
        """Read the load gauges from the engine loops serving, summed, at each scrape."""
        self.requests_running.set_function(lambda: sum(loop.num_running for loop in loops))
        self.requests_waiting.set_function(lambda: sum(loop.num_waiting for loop in loops))
        self.kv_cache_usage.set_function(lambda: sum(loop.num_running for loop in loops)
                                         / sum(loop.max_batch_size for loop in loops))

    def read_offload(self, snap: StatsSnapshot | None, num_layers: int) -> None:
        """Offload and PCIe series from the engine's stats (counters advance by what changed since last time)."""
        if snap is None:
            self.resident_layers.set(num_layers)
            return
        self.resident_layers.set(snap.resident_layers)
        self.streamed_layers.set(snap.streamed_layers)
        self.host_pinned.set(snap.pinned_bytes)
        self.host_pinned_fallback.set(snap.pin_refused)
        self.pcie_h2d_bandwidth.set(snap.h2d_bandwidth)
        last = self._last_offload
        self.pcie_h2d_bytes.inc(snap.h2d_bytes - (last.h2d_bytes if last else 0))
        self.offload_stall_seconds.inc(snap.stall_seconds - (last.stall_seconds if last else 0.0))
        self._last_offload = snap

    def read_probe(self, probe: GpuProbe) -> None:
        """The GPU series from the engine's start-up probe."""
        self.gpu_info.labels(probe.name, probe.capability).set(0 if probe.compute_capability is None else 1)
        self.pcie_link_generation.set(probe.pcie.max_generation if probe.pcie else 0)
        self.pcie_link_width.set(probe.pcie.max_width if probe.pcie else 0)
        self.pcie_h2d_probe.set(probe.h2d_bytes_per_second)

    def read_device(self, device: torch.device | None) -> None:
        """The VRAM series from torch's CUDA allocator (they stay 0 off a GPU)."""
        if device is not None and device.type == "cuda":
            self.vram_used.set(torch.cuda.memory_allocated(device))
            self.vram_reserved.set(torch.cuda.memory_reserved(device))
            self.vram_total.set(torch.cuda.get_device_properties(device).total_memory)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)

    def values(self) -> dict[str, float]:
        """Each unlabelled gauge and counter by its exposition name less the prefix (`generation_tokens_total`)."""
        values = {}
        for family in self.registry.collect():
            if family.type in ("gauge", "counter"):
                for sample in family.samples:
                    if not sample.labels and not sample.name.endswith("_created"):
                        values[sample.name.removeprefix(f"{PREFIX}_")] = sample.value
        return values
