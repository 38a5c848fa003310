"""Every config of a wide space for the int8 kernels, timed one by one on one GPU: what the tuning spaces in
`vramlite/kernels/` should hold.

    python -m benchmarks.sweep_kernels [--ops w8a16 w8a8] [--top 8] [--dtype fp16]
    python -m benchmarks.sweep_kernels --smoke    # no GPU: two configs at a tiny shape in Triton's interpreter

For LLaMA-7B's weight shapes (as `bench_kernels`), W8A16 at M = 1 and 16 and W8A8 at M = 256 and 2048, bf16
activations (or `--dtype fp16`): each config's GPU time in a CUDA graph over weight copies 3x the L2 cache
(`bench_kernels`'s timing), next to `F.linear`'s in the same dtype, and the config the tuner picks from the
kernel's own space. Prints the `--top` fastest per case and writes every timing to
benchmarks/results/kernels-sweep-<gpu>-<dtype>.json. A config that does not compile or run on the GPU is left out
with its error. Compiling dominates: about 75 configs, each compiled once for all shapes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.bench_kernels import (
    SHAPES,
    _interprets_its_own_functions,
    copy_gbps,
    describe,
    graph_seconds,
    timer,
    tuned_by,
    weight_copies,
)

CASES = {"w8a16": [1, 16], "w8a8": [256, 2048]}


def next_power_of_2(n: int) -> int:
    return 1 << (max(n, 1) - 1).bit_length()


def w8a16_space(m: int) -> list[dict[str, Any]]:
    """Tensor-core tiles (BLOCK_M padded to 16) and fp32 multiply-and-reduce tiles (BLOCK_M = M)."""
    block_m = max(16, next_power_of_2(m))
    dot = [dict(USE_DOT=True, BLOCK_M=block_m, BLOCK_N=n, BLOCK_K=k, SPLIT_K=split, num_warps=warps,
                num_stages=stages)
           for n, k, split, warps, stages in itertools.product((16, 32, 64, 128), (128, 256, 512), (1, 2, 4), (4,),
                                                                 (4,))
           if n * k <= 32768]
    rows = next_power_of_2(m)
    fp32 = [dict(USE_DOT=False, BLOCK_M=rows, BLOCK_N=n, BLOCK_K=min(8192 // (rows * n), 512), SPLIT_K=split,
                 num_warps=warps, num_stages=3)
            for n, split, warps in itertools.product((8, 16, 32, 64), (1, 2), (4,))] if m <= 4 else []
    return dot + fp32


def w8a8_space(m: int) -> list[dict[str, Any]]:
    return [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128, 256), (64, 128, 256), (4, 8),
                                                               (3, 4))
            if bm <= max(64, m) and bm * bn * bk <= 128 * 256 * 128 and (warps == 8) == (bm * bn >= 128 * 128)]


def config_of(params: dict[str, Any]) -> Any:
    import triton

    meta = {k: v for k, v in params.items() if k not in ("num_warps", "num_stages")}
    return triton.Config(meta, num_warps=params["num_warps"], num_stages=params["num_stages"])


def sweep_case(op: str, m: int, n: int, k: int, device: str, measure_many: Callable[[list], float],
               space: list[dict[str, Any]], dtype: torch.dtype) -> list[dict[str, Any]]:
    """Each config of `space` for one (op, M, N, K) on `dtype` activations, then `F.linear` in that dtype and the
    tuner's own pick."""
    from vramlite.kernels._common import Backend
    from vramlite.kernels.quant import quantize_weight
    from vramlite.kernels.w8a8 import w8a8_linear_triton
    from vramlite.kernels.w8a16 import w8a16_linear_triton

    launcher = w8a16_linear_triton if op == "w8a16" else w8a8_linear_triton
    backend = Backend.TENSORCORE if device == "cuda" else Backend.PASCAL
    weights = [quantize_weight(torch.randn(n, k, device=device) / k**0.5) for _ in range(weight_copies(n, k, device))]
    x = torch.randn(m, k, device=device, dtype=dtype)
    baseline = f"{str(dtype).removeprefix('torch.')} F.linear"
    nbytes = n * k + 4 * n + 2 * (m * k + m * n)
    rows = []
    for params in space:
        config = config_of(params)
        calls = [functools.partial(launcher, x, q, s, backend=backend, config=config) for q, s in weights]
        try:
            seconds = measure_many(calls)
        except Exception as e:  # too much shared memory, too many registers ...: the tuner leaves these out too
            rows.append({"op": op, "M": m, "N": n, "K": k, "config": describe([config]),
                         "error": str(e).splitlines()[0][:120]})
            continue
        rows.append({"op": op, "M": m, "N": n, "K": k, "config": describe([config]), "us": round(seconds * 1e6, 2),
                     "GB/s": round(nbytes / seconds / 1e9, 1)})
    dense = [(q.to(dtype) * s[:, None].to(dtype)).contiguous() for q, s in weights]
    seconds = measure_many([functools.partial(F.linear, x, w) for w in dense])
    rows.append({"op": op, "M": m, "N": n, "K": k, "config": baseline, "us": round(seconds * 1e6, 2),
                 "GB/s": round((2 * n * k + 2 * (m * k + m * n)) / seconds / 1e9, 1)})
    picked = tuned_by(functools.partial(launcher, x, *weights[0], backend=backend))
    rows.append({"op": op, "M": m, "N": n, "K": k, "config": "tuner: " + (describe(picked) or "nothing tuned now")})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--top", type=int, default=8, help="configs printed per case (all go to the JSON)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16",
                        help="activations (bf16: the engine's default on tensor-core GPUs; --smoke takes fp16)")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, two configs (on CPU: the interpreter)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.smoke:
            print("sweep_kernels needs a CUDA GPU (--smoke checks the script on CPU, in Triton's interpreter)")
            return 0
        if "triton" in sys.modules and not _interprets_its_own_functions():
            print("--smoke on CPU: triton was imported already; run with TRITON_INTERPRET=1")
            return 0
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import: its own jit functions read it then
    from benchmarks.common import gpu_slug, print_table, write_results

    if device == "cuda":
        measure_many = graph_seconds
        print(f"device-to-device copy: {copy_gbps(timer(device)):.1f} GB/s")
    else:
        cpu = timer(device)
        measure_many = lambda calls: cpu(calls[0])  # noqa: E731
    shapes = [(72, 40)] if args.smoke else SHAPES
    # the interpreter multiplies bf16 dot operands as raw bits
    dtype = torch.float16 if args.smoke or args.dtype == "fp16" else torch.bfloat16
    rows: list[dict[str, Any]] = []
    for op in args.ops:
        for m in [3] if args.smoke else CASES[op]:
            space = w8a16_space(m) if op == "w8a16" else w8a8_space(m)
            if args.smoke:
                space = space[:1] + space[-1:]
            for n, k in shapes:
                case = sweep_case(op, m, n, k, device, measure_many, space, dtype)
                rows += case
                timed = sorted((r for r in case if "us" in r), key=lambda r: r["us"])
                print(f"\n{op} M={m} N={n} K={k}: {len(timed)} timed, {sum('error' in r for r in case)} failed; "
                      f"{case[-1]['config']}")
                print_table(timed[: args.top] + [r for r in timed[args.top :] if r["config"].endswith("F.linear")],
                            ["config", "us", "GB/s"])
    if device == "cuda":
        gpu = gpu_slug()
        print(f"\nwrote {write_results(f'kernels-sweep-{gpu}-{args.dtype}', rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
