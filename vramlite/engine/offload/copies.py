"""Copy engines: how the streamer copies weights and how compute waits for them.

The streamer's schedule is device-independent and talks to one of these:
`CudaCopies` (a dedicated copy stream, CUDA events for copy-before-use and
use-before-slot-reuse, timings from events) or `SyncCopies` (a CPU device:
copies are synchronous, markers are None, timings from the wall clock). Tests
drive the same schedule with a simulated one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import torch

from vramlite.engine.offload.stats import OffloadStats


class CopyEngine(Protocol):
    """Markers are opaque: whatever `mark` and `copy` return is only passed back to `copy` and `wait`."""

    def mark(self) -> Any:
        """A marker passed once the compute queued so far has finished."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> Any:
        """Queue `dst.copy_(src)` to start once marker `after` (None: at once) has passed; returns its marker."""

    def wait(self, ready: Any) -> None:
        """Make compute queued from now on wait for marker `ready`."""

    def poll(self) -> None:
        """Account the copies and waits that have finished."""


class SyncCopies:
    """A CPU device: each copy is done when `copy` returns, so nothing ever waits."""

    def __init__(self, stats: OffloadStats, clock: Callable[[], float] = time.perf_counter) -> None:
        self.stats = stats
        self.clock = clock

    def mark(self) -> None:
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any) -> None:
        start = self.clock()
        dst.copy_(src)
        self.stats.record_copy(src.nbytes, self.clock() - start)

    def wait(self, ready: Any) -> None:
        pass

    def poll(self) -> None:
        pass


class CudaCopies:
    """A dedicated copy stream; compute runs on the device's current stream. Never synchronizes the device.

    Each copy is bracketed by timing events on the copy stream, each wait by
    timing events on the compute stream (the second one completes when both
    the earlier compute and the awaited copy are done, so their gap is the
    stall). `poll` reads the pairs that have completed, without blocking, from the engine's thread or (for a
    metrics scrape while the engine is idle) another.
    """

    def __init__(self, device: torch.device, stats: OffloadStats) -> None:
        self.device = device
        self.stats = stats
        self.stream = torch.cuda.Stream(device)
        self._copies: deque[tuple[torch.cuda.Event, torch.cuda.Event, int]] = deque()
        self._waits: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        self._polling = threading.Lock()  # one reader at a time: each pair is checked, then taken

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None) -> torch.cuda.Event:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        self._copies.append((start, end, src.nbytes))
        return end

    def wait(self, ready: torch.cuda.Event) -> None:
        compute = torch.cuda.current_stream(self.device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(ready)
        after.record(compute)
        self._waits.append((before, after))

    def poll(self) -> None:
        with self._polling:
            while self._copies and self._copies[0][1].query():
                start, end, nbytes = self._copies.popleft()
                self.stats.record_copy(nbytes, start.elapsed_time(end) / 1e3)
            while self._waits and self._waits[0][1].query():
                before, after = self._waits.popleft()
                self.stats.record_stall(before.elapsed_time(after) / 1e3)
