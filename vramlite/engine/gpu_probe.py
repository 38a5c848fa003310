"""What the engine learns about its device at start: GPU name, compute capability, memory, PCIe link, and the
pinned host-to-device bandwidth that the offload planner divides streamed bytes by.

The PCIe link comes from NVML (`pynvml`, of the optional `nvidia-ml-py` package) when it is installed; the
bandwidth from CUDA-event timings of a few copies out of one pinned buffer, registered like the host arena's
(so it measures the memory the streamed layers will be copied from). On a CPU the probe is a "cpu" probe
whose GPU fields are empty and read 0.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# dp4a, Pascal GTX 10xx's int8 dot product, is the oldest int8 path the kernels have (sm_60 lacks it).
MIN_CAPABILITY = (6, 1)
PROBE_BYTES = 64 * 2**20
PROBE_COPIES = 8
PROBE_BUDGET_S = 1.0  # the timed copies stop early when they have taken this long
CU126_INDEX = "https://download.pytorch.org/whl/cu126"


class UnsupportedDeviceError(ValueError):
    """The GPU is too old for vramlite, or the installed torch has no code for it."""


@dataclass(frozen=True)
class PcieLink:
    """The PCIe link as NVML reports it: now (it drops to a lower generation when idle) and at most."""

    generation: int
    width: int
    max_generation: int  # the most this device and this host can do together
    max_width: int


@dataclass(frozen=True)
class GpuProbe:
    """The device facts logged at start, exported as metrics and shown in `/info`."""

    device: str  # "cpu", "cuda:0"
    name: str
    compute_capability: tuple[int, int] | None = None
    total_bytes: int = 0
    free_bytes: int = 0
    pcie: PcieLink | None = None
    h2d_bytes_per_second: float = 0.0
    h2d_pinned: bool = False
    torch_archs: tuple[str, ...] = ()

    @classmethod
    def cpu(cls) -> GpuProbe:
        return cls(device="cpu", name="cpu")

    @property
    def capability(self) -> str:
        """"6.1", or "" without a GPU."""
        return "" if self.compute_capability is None else "{}.{}".format(*self.compute_capability)

    def as_dict(self) -> dict[str, Any]:
        """The probe for `/info`."""
        out = asdict(self)
        out["compute_capability"] = self.capability or None
        out["torch_archs"] = list(self.torch_archs)
        return out

    def log_line(self) -> str:
        """One structured line (key=value) for the startup log."""
        fields: dict[str, Any] = {"device": self.device, "name": f'"{self.name}"'}
        if self.compute_capability is not None:
            link = self.pcie
            fields |= {"compute_capability": self.capability, "vram_total_bytes": self.total_bytes,
                       "vram_free_bytes": self.free_bytes,
                       "pcie_gen": link.max_generation if link else "-", "pcie_width": link.max_width if link else "-",
                       "pcie_gen_now": link.generation if link else "-", "pcie_width_now": link.width if link else "-",
                       "h2d_probe_gbps": f"{self.h2d_bytes_per_second / 1e9:.2f}", "h2d_pinned": self.h2d_pinned,
                       "torch_archs": ",".join(self.torch_archs) or "-"}
        return "event=gpu_probe " + " ".join(f"{k}={v}" for k, v in fields.items())


def parse_arch(flag: str) -> tuple[str, tuple[int, int]]:
    """A torch/nvcc arch flag → its kind and capability: `sm_61` → ("sm", (6, 1)), `compute_90a` → ("compute",
    (9, 0)), `sm_120` → ("sm", (12, 0)). ValueError for anything else."""
    kind, _, number = flag.partition("_")
    digits = number.rstrip("af")
    if kind not in ("sm", "compute") or len(digits) < 2 or not digits.isdigit():
        raise ValueError(f"{flag!r} is not a CUDA arch flag such as sm_61 or compute_90")
    return kind, (int(digits[:-1]), int(digits[-1]))


def arch_runs_on(flag: str, capability: tuple[int, int]) -> bool:
    """Whether code built for `flag` runs on a GPU of `capability`.

    SASS (`sm_XY`) runs on the same major version with a minor ≥ Y (sm_60 code runs on a GTX 1060, sm_61);
    the architecture-specific `sm_90a` only on 9.0 itself; PTX (`compute_XY`) is compiled by the driver for
    any capability ≥ X.Y.
    """
    kind, arch = parse_arch(flag)
    if kind == "compute":
        return capability >= arch
    if flag.endswith(("a", "f")):
        return capability == arch
    return capability[0] == arch[0] and capability[1] >= arch[1]


def compiled_archs() -> tuple[str, ...]:
    """The CUDA arch flags the installed torch carries code for; () for a CPU build.

    Read from torch's build flags rather than `torch.cuda.get_arch_list()`, which some torch versions answer
    with [] when no GPU is visible (as in `docker build`).
    """
    if torch.version.cuda is None:
        return ()
    return tuple((torch._C._cuda_getArchFlags() or "").split())


def check_capability(name: str, capability: tuple[int, int], archs: Sequence[str] = ()) -> None:
    """UnsupportedDeviceError naming the capability when vramlite cannot use the GPU, or when the torch build
    (`archs`, its arch flags; empty = unknown) has no code that runs on it."""
    cc = "{}.{}".format(*capability)
    sm = "sm_{}{}".format(*capability)
    if capability < MIN_CAPABILITY:
        raise UnsupportedDeviceError(
            f"{name} has compute capability {cc} ({sm}); vramlite's GPU kernels need "
            f"{'{}.{}'.format(*MIN_CAPABILITY)} (sm_61, a Pascal GTX 10xx) or newer for int8 dot products. "
            f"Run on the CPU instead: --device cpu")
    if archs and not any(arch_runs_on(a, capability) for a in archs):
        raise UnsupportedDeviceError(
            f"{name} has compute capability {cc} ({sm}), but this torch {torch.__version__} only carries code for "
            f"{', '.join(archs)}; install a torch build that includes {sm} (the CUDA 12.6 wheels do: pip install "
            f"torch --index-url {CU126_INDEX}), or run on the CPU with --device cpu")


def bandwidth(nbytes: int, seconds: Sequence[float]) -> float:
    """Bytes per second of copies of `nbytes` each that took `seconds`; 0 when nothing was timed."""
    total = sum(seconds)
    return nbytes * len(seconds) / total if total > 0 else 0.0


def measure_h2d(device: torch.device, nbytes: int = PROBE_BYTES, copies: int = PROBE_COPIES,
                budget_s: float = PROBE_BUDGET_S) -> tuple[float, bool]:
    """Host-to-device bytes/s of `copies` copies of a registered (pinned) buffer of `nbytes`, after one warm-up
    copy, stopping early after `budget_s`; and whether the buffer could be pinned (else it measured pageable)."""
    from vramlite.engine.offload.arena import cuda_host_register

    host = torch.empty(nbytes, dtype=torch.uint8)
    pinned = cuda_host_register(host.data_ptr(), nbytes) == 0
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    seconds: list[float] = []
    try:
        with torch.cuda.stream(stream):
            target.copy_(host, non_blocking=True)
            start = time.perf_counter()
            for _ in range(copies):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record(stream)
                target.copy_(host, non_blocking=True)
                end.record(stream)
                end.synchronize()
                seconds.append(begin.elapsed_time(end) / 1e3)
                if time.perf_counter() - start > budget_s:
                    break
    finally:
        stream.synchronize()
        if pinned:
            torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
        del target
        torch.cuda.empty_cache()
    return bandwidth(nbytes, seconds), pinned


def pcie_link(uuid: str | None, index: int) -> PcieLink | None:
    """The GPU's PCIe link from NVML (found by its UUID, else by index); None without `pynvml` or on NVML errors."""
    try:
        import pynvml
    except ImportError:
        log.debug("pynvml is not installed (pip install nvidia-ml-py): no PCIe link facts")
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        log.debug("NVML unavailable: %s", e)
        return None
    try:
        handle = (pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid
                  else pynvml.nvmlDeviceGetHandleByIndex(index))
        return PcieLink(generation=pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
                        width=pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
                        max_generation=pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
                        max_width=pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle))
    except pynvml.NVMLError as e:
        log.debug("NVML could not read the PCIe link: %s", e)
        return None
    finally:
        pynvml.nvmlShutdown()


def probe_device(device: torch.device, measure_bandwidth: bool = True) -> GpuProbe:
    """The facts about `device`; raises UnsupportedDeviceError for a GPU vramlite cannot use.

    On a GPU this takes up to about `PROBE_BUDGET_S` for the bandwidth (skipped with `measure_bandwidth=False`).
    """
    if device.type != "cuda":
        return GpuProbe.cpu()
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    capability = (props.major, props.minor)
    archs = compiled_archs()
    check_capability(props.name, capability, archs)
    free, total = torch.cuda.mem_get_info(index)
    rate, pinned = measure_h2d(torch.device("cuda", index)) if measure_bandwidth else (0.0, False)
    return GpuProbe(device=f"cuda:{index}", name=props.name, compute_capability=capability, total_bytes=total,
                    free_bytes=free, pcie=pcie_link(str(getattr(props, "uuid", "")) or None, index),
                    h2d_bytes_per_second=rate, h2d_pinned=pinned, torch_archs=archs)


def check_build(capability: tuple[int, int], archs: Sequence[str]) -> None:
    """UnsupportedDeviceError unless `archs` (a torch build's arch flags) hold compiled code (SASS, not only PTX
    for the driver to compile) that runs on `capability`: what the image build checks for the GTX 1060."""
    sm = "sm_{}{}".format(*capability)
    if not archs:
        raise UnsupportedDeviceError(f"torch {torch.__version__} is a CPU-only build: no code for {sm}")
    if not any(a.startswith("sm_") and arch_runs_on(a, capability) for a in archs):
        raise UnsupportedDeviceError(f"torch {torch.__version__} carries code for {', '.join(archs)}, none of which "
                                     f"runs on {sm}; use the CUDA 12.6 wheels ({CU126_INDEX})")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vramlite.engine.gpu_probe`: print the default device's probe as one line; with `--check-build 6.1`,
    check instead that the installed torch carries code for that compute capability (no GPU needed)."""
    import argparse

    from vramlite.engine.device import pick_device

    parser = argparse.ArgumentParser(prog="python -m vramlite.engine.gpu_probe", description=main.__doc__)
    parser.add_argument("--check-build", metavar="X.Y", help="compute capability the torch build must run on")
    args = parser.parse_args(argv)
    if args.check_build is None:
        print(probe_device(pick_device()).log_line())
        return 0
    major, _, minor = args.check_build.partition(".")
    archs = compiled_archs()
    try:
        check_build((int(major), int(minor or 0)), archs)
    except UnsupportedDeviceError as e:
        print(f"error: {e}")
        return 1
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) runs on {args.check_build}: {' '.join(archs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
