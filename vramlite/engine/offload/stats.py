"""Offload accounting the server exports: bytes and time of the weight copies, compute stalls, layer counts."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

WINDOW = 64  # copies the bandwidth gauge averages over


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent reading of `OffloadStats` (what a metrics scrape sets its series from)."""

    resident_layers: int
    streamed_layers: int
    host_bytes: int
    pinned_bytes: int
    pin_refused: bool  # the host memory could not be pinned: copies come from pageable memory
    h2d_bytes: int
    num_copies: int
    copy_seconds: float
    stall_seconds: float
    h2d_bandwidth: float  # bytes/s over the last WINDOW timed copies; 0 before the first


class OffloadStats:
    """Counters fed by the streamer on the engine thread and read from any thread.

    Copy durations come from CUDA events on a GPU (read when the copies have
    finished, so they lag the byte counter by a few copies) and from the wall
    clock for the synchronous copies of a CPU device.
    """

    def __init__(self, resident_layers: int, streamed_layers: int, host_bytes: int = 0, pinned: bool = False,
                 pin_refused: bool = False) -> None:
        self.resident_layers = resident_layers
        self.streamed_layers = streamed_layers
        self.host_bytes = host_bytes
        self.pinned = pinned
        self.pin_refused = pin_refused
        self._lock = threading.Lock()
        self._h2d_bytes = 0
        self._num_copies = 0
        self._copy_seconds = 0.0
        self._stall_seconds = 0.0
        self._window: deque[tuple[int, float]] = deque(maxlen=WINDOW)

    def record_issue(self, nbytes: int) -> None:
        """A copy of `nbytes` was queued."""
        with self._lock:
            self._h2d_bytes += nbytes
            self._num_copies += 1

    def record_copy(self, nbytes: int, seconds: float) -> None:
        """A copy of `nbytes` took `seconds` on the copy engine."""
        with self._lock:
            self._copy_seconds += seconds
            self._window.append((nbytes, seconds))

    def record_stall(self, seconds: float) -> None:
        """Compute waited `seconds` for a layer's weights."""
        with self._lock:
            self._stall_seconds += seconds

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            window_seconds = sum(s for _, s in self._window)
            bandwidth = sum(b for b, _ in self._window) / window_seconds if window_seconds > 0 else 0.0
            return StatsSnapshot(self.resident_layers, self.streamed_layers, self.host_bytes,
                                 self.host_bytes if self.pinned else 0, self.pin_refused, self._h2d_bytes,
                                 self._num_copies, self._copy_seconds, self._stall_seconds, bandwidth)
