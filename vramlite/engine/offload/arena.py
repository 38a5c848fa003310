"""The host arena: every streamed layer in one allocation, pinned once with cudaHostRegister.

Why not `pin_memory=True` tensors: PyTorch's caching host allocator rounds
each pinned block up to a power of two, so a 6.7 GB model could take 8 GB of
page-locked RAM. A plain allocation registered with the driver costs exactly
its size. If registering fails (a small host, a container with little
lockable memory) the arena stays pageable: nothing breaks, but copies get
slower and no longer overlap compute (a copy from pageable memory goes
through a driver buffer, and the host waits for it).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Sequence

import torch

from vramlite.engine.offload.layout import LayerLayout
from vramlite.engine.offload.planner import format_bytes

log = logging.getLogger(__name__)

Register = Callable[[int, int], int]  # (pointer, bytes) → a cudaError_t value, 0 for success


def cuda_host_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister with default flags; returns the CUDA error code."""
    err = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
    if err:
        _clear_cuda_error()
    return err


def host_register(device: torch.device) -> Register | None:
    """How to pin host memory for copies to `device`: None (stay pageable) when it is not a GPU."""
    return cuda_host_register if device.type == "cuda" else None


def _clear_cuda_error() -> None:
    # A failed runtime call also sets the thread's "last error", which the next kernel launch check would
    # report as its own; torch binds no cudaGetLastError, so reset it through the loaded libcudart.
    for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.13", "libcudart.so.11.0"):
        try:
            ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_NOW).cudaGetLastError()
            return
        except (OSError, AttributeError):
            continue
    log.warning("no loaded libcudart to reset the failed cudaHostRegister's error: the next CUDA call may "
                "report it as its own")


class HostArena:
    """One host buffer holding the streamed layers back to back, each in its `LayerLayout`."""

    def __init__(self, layouts: Sequence[LayerLayout], register: Register | None = None) -> None:
        """`register` pins the buffer (`cuda_host_register` for a CUDA device, None to stay pageable)."""
        self.layouts = tuple(layouts)
        self.offsets = []
        total = 0
        for layout in self.layouts:
            self.offsets.append(total)
            total += layout.nbytes
        self.nbytes = total
        self.buffer = torch.empty(total, dtype=torch.uint8)
        self.pinned = False
        self.pin_refused = False  # pinning was asked for and failed: the buffer is pageable
        if register is not None and total:
            err = register(self.buffer.data_ptr(), total)
            self.pinned = err == 0
            self.pin_refused = not self.pinned
            if not self.pinned:
                log.warning("could not pin %s of host memory for the streamed layers (CUDA error %d): using "
                            "pageable memory, so host-to-device copies are slower and do not overlap compute; "
                            "raise the locked-memory limit (ulimit -l, or docker run --ulimit memlock=-1)",
                            format_bytes(total), err)
        self._unregister = self.pinned and register is cuda_host_register

    def region(self, j: int) -> torch.Tensor:
        """Streamed layer j's bytes (uint8)."""
        return self.buffer[self.offsets[j] : self.offsets[j] + self.layouts[j].nbytes]

    def __del__(self) -> None:
        if getattr(self, "_unregister", False):
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
