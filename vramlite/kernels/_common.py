"""Plumbing shared by the kernel modules: the optional triton import, backends, launching, config tuning and
operand checks."""

import enum
import functools
import os
import statistics
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # `vramlite.kernels` still imports; dispatch then uses the torch references
    triton = None
    # Kernel signatures evaluate `tl.constexpr` annotations at definition time.
    tl = SimpleNamespace(constexpr=None)

HAS_TRITON = triton is not None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Backend(enum.Enum):
    """Which kernel variants a device gets (see `vramlite.kernels.dispatch.backend_for`)."""

    TENSORCORE = "tensorcore"  # CC >= 8.0: fp16/bf16 tensor-core dots, int8 mma
    PASCAL = "pascal"  # CC 6.1-7.5: fp32 math (Pascal's fp16 runs at 1/64 rate), dp4a for int8
    REFERENCE = "reference"  # torch: CPU tensors, CC < 6.1, or no triton


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for Triton's CPU interpreter (read now: tests set it per test)."""
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is None:  # triton < 3.4 (3.3 comes with torch 2.7, the Docker image's): its jit reads the variable
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def jit(fn: Callable) -> Any:
    """`triton.jit`, or the plain function when triton is missing (kernels are then never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


# Fused multiply-adds, pinned: Triton 3.10 turns them off by default (3.9 warns about it), and the fp32 dot
# products want the one rounding.
FP_FUSION = True


def launch(kernel: Any, grid: tuple[int, ...], config: "triton.Config", *args: Any, **kwargs: Any) -> None:
    """Launch `kernel[grid]` with a config's meta-parameters, warps and stages."""
    kernel[grid](*args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages,
                 enable_fp_fusion=FP_FUSION, **kwargs)


_tuned: dict[tuple, "triton.Config"] = {}


def gpu_milliseconds(fn: Callable[[], Any], reps: int = 20) -> float:
    """Median milliseconds of `fn` on the current GPU's current stream, after one untimed call (it compiles).

    Each timed call starts with the L2 cache flushed, as triton's `do_bench` does, but by a buffer twice the
    L2's size (3 MiB on a GTX 1060, 120 MiB on an H200) instead of do_bench's 256 MiB, which a GPU filled up to
    its memory limit may not have room for. Weights stream from DRAM in a decode step: so they do here.
    """
    fn()
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    flush = torch.empty(2 * getattr(props, "L2_cache_size", 64 * 2**20), dtype=torch.uint8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    events[-1][1].synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def tuned_config(key: tuple, configs: Sequence["triton.Config"], run: Callable[["triton.Config"], Any],
                 timer: Callable[[Callable[[], Any]], float] = gpu_milliseconds) -> Any:
    """The fastest of `configs` for `key`, timed with `timer(lambda: run(config))` on first use and cached for
    the process; a config that fails to compile or run (too much shared memory for this GPU, say) is left out.

    The interpreter gets the first config untimed. The first call per key takes a while (compiling and timing
    every config): warm up before CUDA-graph capture or latency-sensitive serving.
    """
    if interpreting() or len(configs) == 1:
        return configs[0]
    best = _tuned.get(key)
    if best is None:
        timings, failure = [], None
        for i, config in enumerate(configs):
            try:
                timings.append((timer(functools.partial(run, config)), i))
            except Exception as e:  # any failure rules the config out; the others may run
                failure = e
        if not timings:
            raise RuntimeError(f"no kernel config runs on this GPU for {key}: {failure!r}") from failure
        best = _tuned[key] = configs[min(timings)[1]]
    return best


def run_tuned(x: torch.Tensor, n: int, key: tuple, configs: Sequence["triton.Config"],
              run: Callable[["triton.Config"], torch.Tensor], config: "triton.Config | None") -> torch.Tensor:
    """A launcher's product y [M, N]: `run` with `config`, or else with the tuned config for `key`
    (`tuned_config`). x of no rows gives an empty y without a launch (a grid of zero programs is invalid)."""
    if x.shape[0] == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    return run(config or tuned_config(key, configs, run))


def check_linear_args(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[int, int]:
    """Check the operands of y = x · (qweight ∘ scale)ᵀ + bias and return (N, K); raise ValueError if unfit."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or 0 in qweight.shape:
        raise ValueError(
            f"qweight must be a non-empty 2-D int8 tensor [N, K], got {qweight.dtype} {tuple(qweight.shape)}"
        )
    n, k = qweight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must be [..., K] with K={k} (qweight's columns), got {tuple(x.shape)}")
    if scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError(f"scale must be float32 [N]=[{n}], got {scale.dtype} {tuple(scale.shape)}")
    if bias is not None and (not bias.is_floating_point() or bias.shape != (n,)):
        raise ValueError(f"bias must be a float tensor [N]=[{n}], got {bias.dtype} {tuple(bias.shape)}")
    if any(t is not None and t.device != x.device for t in (qweight, scale, bias)):
        devices = {str(t.device) for t in (x, qweight, scale, bias) if t is not None}
        raise ValueError(f"operands are on different devices: {sorted(devices)}")
    return n, k


def check_kernel_operands(x: torch.Tensor, backend: Backend | None = None, **operands: torch.Tensor | None) -> None:
    """What a Triton launcher needs besides `check_linear_args`: triton, a Triton backend, 2-D contiguous x
    with K > 0, contiguous operands."""
    if not HAS_TRITON:
        raise ValueError("triton is not installed")
    if backend is Backend.REFERENCE:
        raise ValueError("the reference backend has no Triton kernel: call the *_ref function")
    if backend is Backend.PASCAL and x.dtype == torch.bfloat16:
        raise ValueError("bfloat16 needs the tensor-core backend (CC >= 8.0): pass float32 or float16")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be 2-D [M, K] with K > 0, got {tuple(x.shape)}: vramlite.kernels.dispatch reshapes")
    for name, t in {"x": x, **operands}.items():
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def check_linear_launch(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        backend: Backend) -> tuple[int, int]:
    """A linear launcher's checks, `check_linear_args` then `check_kernel_operands`; returns (N, K)."""
    n, k = check_linear_args(x, qweight, scale, bias)
    check_kernel_operands(x, backend, qweight=qweight, scale=scale, bias=bias)
    return n, k
