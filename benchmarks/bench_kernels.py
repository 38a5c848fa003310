"""int8 kernel speed on one GPU: W8A16 (decode) and W8A8 (prefill) against the torch baselines.

    python -m benchmarks.bench_kernels [--peak-gbps 3350] [--peak-tops 1979] [--backend pascal] [--dtype bf16]
    python -m benchmarks.bench_kernels --smoke    # no GPU: tiny shapes in Triton's interpreter, checks the plumbing

Weight shapes [N, K]: 4096x4096, 11008x4096, 4096x11008 (LLaMA-7B's attention, up/gate and down projections).
- W8A16, M = 1..64, against fp16 `F.linear` (cuBLAS) and naive dequantize-then-`F.linear`;
- W8A8 (per-token activation quantization + int8 GEMM), M = 32..2048, against fp16 `F.linear` and
  `torch._int_mm` (the int8 GEMM alone: no quantization, no scales).
Our kernels are launched directly (no dispatch), with the variants `vramlite.kernels.dispatch` picks for the GPU unless
`--backend` says otherwise; each is tuned before it is timed. Reports µs, GB/s (weight bytes in the method's
own format + activations in and out, over the time), % of the DRAM bandwidth (a 1 GiB device-to-device copy's,
timed in the same run, unless `--peak-gbps` gives it), and for W8A8 TOPS and % of `--peak-tops`; our kernels'
rows name the tuned config. Prints a table and writes benchmarks/results/kernels-<gpu>-<dtype>.json. Without a GPU
(and without --smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
W8A16_ROWS = [1, 4, 16, 32, 64]
W8A8_ROWS = [32, 64, 256, 2048]  # at 32 and 64 both: where dispatch should switch (W8A16_MAX_M)
SMOKE_SHAPES = [(72, 40)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peak-gbps", type=float,
                        help="the GPU's DRAM bandwidth for the %% of peak column (default: a device-to-device copy's, "
                             "measured in the run)")
    parser.add_argument("--peak-tops", type=float, help="the GPU's dense int8 TOPS, for W8A8's %% of peak")
    parser.add_argument("--backend", choices=["tensorcore", "pascal"], help="kernel variants (default: dispatch's)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="activation dtype of our kernels")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (on CPU: in Triton's interpreter)")
    return parser.parse_args(argv)


def timer(device: str) -> Callable[[Callable[[], Any]], float]:
    """Seconds per call: triton's do_bench on CUDA, the median of a few calls on CPU (smoke runs only)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100) / 1e3

    def cpu(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return cpu


def row(op: str, method: str, m: int, n: int, k: int, seconds: float, nbytes: int, args: argparse.Namespace,
        ops: int | None = None) -> dict[str, Any]:
    """One result; the % of peak columns only when a peak was given."""
    gbps = nbytes / seconds / 1e9
    out = {"op": op, "method": method, "M": m, "N": n, "K": k, "us": round(seconds * 1e6, 1), "GB/s": round(gbps, 1)}
    if args.peak_gbps:
        out["%peak_bw"] = round(100 * gbps / args.peak_gbps, 1)
    if ops is not None:
        out["TOPS"] = round(ops / seconds / 1e12, 2)
        if args.peak_tops:
            out["%peak_ops"] = round(100 * out["TOPS"] / args.peak_tops, 1)
    return out


def tuned_by(call: Callable[[], Any]) -> list[Any]:
    """Run `call`; the kernel configs it tuned (none where its shape classes were tuned before)."""
    from vramlite.kernels._common import _tuned

    known = set(_tuned)
    call()
    return [config for key, config in _tuned.items() if key not in known]


def describe(configs: list[Any]) -> str:
    """The tuned kernel configs, shortly: meta-parameters, warps and stages."""
    return "; ".join(" ".join(f"{k}={v}" for k, v in c.kwargs.items()) + f" w={c.num_warps} s={c.num_stages}"
                     for c in configs)


def copy_gbps(measure: Callable[[Callable[[], Any]], float], nbytes: int = 1 << 30) -> float:
    """DRAM bandwidth as a device-to-device copy achieves it: bytes read plus bytes written, over the time."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = measure(functools.partial(dst.copy_, src))
    return 2 * nbytes / seconds / 1e9


def dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The naive W8A16: dequantize the whole weight to fp16, then cuBLAS."""
    return F.linear(x, qweight.half() * scale[:, None].half())


def graph_seconds(calls: list[Callable[[], Any]], replays: int = 20) -> float:
    """Seconds per call of `calls` replayed back to back from one captured CUDA graph: the GPU's time without the
    Python launch cost between calls (as in the engine's captured decode step). Each call has its own weights, so
    they stream from DRAM rather than from the L2 cache."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture wants its warm-up off the default stream
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / len(calls)


def weight_copies(n: int, k: int, device: str) -> int:
    """How many copies of an int8 [n, k] weight make three times the GPU's L2 cache (1 on CPU)."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 64 << 20)
    return max(1, -(-3 * l2 // (n * k)))


def bench_shape(n: int, k: int, rows: list[int], op: str, args: argparse.Namespace, device: str,
                backend: Any, measure: Callable[[Callable[[], Any]], float]) -> list[dict[str, Any]]:
    """One weight shape: our kernel for `op` and its baselines at each M. `us` is the GPU time of a call in a
    CUDA graph (on CPU: of a call); `call_us` the time of a call launched from Python, the L2 cache flushed."""
    from vramlite.kernels.quant import quantize_weight
    from vramlite.kernels.w8a8 import w8a8_linear_triton
    from vramlite.kernels.w8a16 import w8a16_linear_triton

    ours = w8a16_linear_triton if op == "w8a16" else w8a8_linear_triton
    weights = []
    for _ in range(weight_copies(n, k, device)):
        qweight, scale = quantize_weight(torch.randn(n, k, device=device) / k**0.5)
        weights.append((qweight, scale, (qweight.half() * scale[:, None].half()).contiguous()))
    results, config = [], ""
    for m in rows:
        x = torch.randn(m, k, device=device, dtype=DTYPES[args.dtype])
        x16 = x.half()
        xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=device)
        act, act16 = (m * k + m * n) * x.element_size(), (m * k + m * n) * 2
        methods: dict[str, tuple[list[Callable[[], Any]], int]] = {  # one call per weight copy
            f"vramlite {op}": ([functools.partial(ours, x, q, s, backend=backend) for q, s, _ in weights],
                               n * k + 4 * n + act),
            "fp16 F.linear": ([functools.partial(F.linear, x16, w) for _, _, w in weights], 2 * n * k + act16),
        }
        if op == "w8a16":
            methods["dequant+F.linear"] = ([functools.partial(dequant_linear, x16, q, s) for q, s, _ in weights],
                                           n * k + act16)
        else:
            methods["torch._int_mm"] = ([functools.partial(torch._int_mm, xq, q.t()) for q, _, _ in weights],
                                        n * k + m * k + 4 * m * n)
        for method, (calls, nbytes) in methods.items():
            try:
                newly_tuned = tuned_by(calls[0])  # compile, and tune our kernels, outside the timing
                call = measure(calls[0])
                seconds = graph_seconds(calls) if device == "cuda" else call
            except RuntimeError as e:  # e.g. torch._int_mm's shape limits, or no int8 GEMM on this GPU
                print(f"  {method} M={m} N={n} K={k}: n/a ({str(e).splitlines()[0][:80]})", file=sys.stderr)
                continue
            ops = 2 * m * n * k if op == "w8a8" else None
            results.append(row(op, method, m, n, k, seconds, nbytes, args, ops) | {"call_us": round(call * 1e6, 1)})
            if method.startswith("vramlite"):
                config = describe(newly_tuned) if newly_tuned else config  # else M shares the last M's tuning
                results[-1]["config"] = config
    return results


def _interprets_its_own_functions() -> bool:
    """Whether the triton already imported runs its own jit functions (`tl.sum`, ...) in the interpreter: they
    chose when triton was imported, so setting TRITON_INTERPRET now would come too late for them."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            print("bench_kernels needs a CUDA GPU (--smoke checks the script on CPU, in Triton's interpreter)")
            return 0
        # Triton's own jit functions pick the interpreter when triton is first imported.
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules and not _interprets_its_own_functions():
            print("--smoke on CPU: triton was imported already; run with TRITON_INTERPRET=1")
            return 0

    import triton

    from benchmarks.common import gpu_slug, print_table, write_results
    from vramlite.kernels._common import Backend
    from vramlite.kernels.dispatch import backend_for

    if args.backend:
        backend = Backend(args.backend)
    elif device == "cpu":
        backend = Backend.PASCAL  # the interpreter runs either variant
    else:
        backend = backend_for(torch.device("cuda", torch.cuda.current_device()))
    if backend is Backend.REFERENCE:
        print(f"no Triton kernels for this GPU (compute capability {torch.cuda.get_device_capability()})")
        return 0
    if backend is Backend.PASCAL and args.dtype == "bf16":
        print("the Pascal variants take fp16 or fp32 activations")
        return 2
    measure = timer(device)
    if device == "cuda" and not args.peak_gbps:
        args.peak_gbps = round(copy_gbps(measure), 1)
        print(f"device-to-device copy: {args.peak_gbps} GB/s (the %peak_bw column's 100%)")
    shapes, rows16, rows8 = (SMOKE_SHAPES, [1, 3], [17]) if args.smoke else (SHAPES, W8A16_ROWS, W8A8_ROWS)
    results = []
    for n, k in shapes:
        results += bench_shape(n, k, rows16, "w8a16", args, device, backend, measure)
        results += bench_shape(n, k, rows8, "w8a8", args, device, backend, measure)
    print(f"{backend.value} kernels, {args.dtype} activations")
    print_table(results, ["op", "method", "M", "N", "K", "us", "GB/s", "%peak_bw", "TOPS", "%peak_ops", "call_us",
                           "config"])
    if args.smoke:
        return 0
    gpu = gpu_slug()
    path = write_results(f"kernels-{gpu}-{args.dtype}", results, triton=triton.__version__, cuda=torch.version.cuda,
                         backend=backend.value, dtype=args.dtype, peak_gbps=args.peak_gbps, peak_tops=args.peak_tops)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
