"""Decode attention on one GPU: the Triton kernel against the batched matmuls it replaces in the engine.

    python -m benchmarks.decode_attention [--dtype bf16]

LLaMA-7B's attention (32 heads of 128 over 32 KV heads) and a grouped one (32 over 8); B = 2, 8, 32 sequences
whose lengths spread evenly over [L/2, L], L = 128, 1024, 4096, in slots taken in reverse (not consecutive, as
after requests come and go: the engine's matmul path then gathers them). Both as a decode step calls them:
`vramlite.kernels.decode_attention`, and the engine's batched matmuls (slots gathered up to the longest length,
padding masked). `us` is the GPU time of a call in a CUDA graph (small caches stay in the L2 cache: both methods
alike), `call_us` an eager call's, launch included; GB/s counts the keys and values of each sequence's own length
against a device-to-device copy's, timed in the same run. Prints a table and writes
benchmarks/results/decode-attention-<gpu>-<dtype>.json. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import torch

from benchmarks.bench_kernels import DTYPES, copy_gbps, graph_seconds, timer
from benchmarks.common import gpu_slug, print_table, write_results
from vramlite.engine.layers.attention import _decode
from vramlite.kernels import decode_attention

HEADS, HEAD_DIM = 32, 128
KV_HEADS = [32, 8]
BATCHES = [2, 8, 32]
LENGTHS = [128, 1024, 4096]


def engine_matmuls(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor,
                   mask: torch.Tensor, scale: float) -> torch.Tensor:
    """The engine's decode attention without the kernel, as `vramlite.engine.layers.attention` runs it in each
    layer for slots given as a tensor: the slots gathered up to the longest length (the mask's), then the batched
    matmuls. The mask [B, 1, 1, longest] is the runner's, built once a step."""
    longest = mask.shape[-1]
    return _decode(q, cache_k[slots, :, :longest], cache_v[slots, :, :longest], mask, scale)


def bench_case(kv_heads: int, batch: int, length: int, dtype: torch.dtype, peak: float) -> list[dict[str, Any]]:
    q = torch.randn(batch, HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    cache_k = torch.randn(batch, kv_heads, length, HEAD_DIM, device="cuda", dtype=dtype)
    cache_v = torch.randn_like(cache_k)
    slots = torch.arange(batch - 1, -1, -1, device="cuda")
    positions = torch.linspace(length // 2, length, batch, device="cuda").long() - 1
    read = int((positions + 1).sum()) * kv_heads * HEAD_DIM * cache_k.element_size() * 2
    measure = timer("cuda")
    mask = (torch.arange(length, device="cuda") < (positions + 1)[:, None])[:, None, None, :]
    scale = HEAD_DIM**-0.5
    methods = {  # max_length: the engine passes the step's longest length
        "vramlite kernel": functools.partial(decode_attention, q, cache_k, cache_v, slots, positions, scale,
                                             max_length=length),
        "engine matmuls": functools.partial(engine_matmuls, q, cache_k, cache_v, slots, mask, scale),
    }
    rows = []
    for method, call in methods.items():
        seconds = graph_seconds([call])
        rows.append({"method": method, "kv_heads": kv_heads, "B": batch, "L": length, "us": round(seconds * 1e6, 1),
                     "GB/s": round(read / seconds / 1e9, 1), "%peak_bw": round(100 * read / seconds / 1e9 / peak, 1),
                     "call_us": round(measure(call) * 1e6, 1)})
    rows[0]["speedup"] = round(rows[1]["us"] / rows[0]["us"], 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/decode_attention.py needs a CUDA GPU; none is visible here, nothing measured.")
        return 0
    peak = copy_gbps(timer("cuda"))
    print(f"device-to-device copy: {peak:.0f} GB/s (the %peak_bw column's 100%)")
    rows = []
    for kv_heads in KV_HEADS:
        for batch in BATCHES:
            for length in LENGTHS:
                rows += bench_case(kv_heads, batch, length, DTYPES[args.dtype], peak)
                print(rows[-2], rows[-1], flush=True)
    print_table(rows, ["method", "kv_heads", "B", "L", "us", "GB/s", "%peak_bw", "call_us", "speedup"])
    gpu = gpu_slug()
    print(f"wrote {write_results(f'decode-attention-{gpu}-{args.dtype}', rows, dtype=args.dtype, peak_gbps=peak)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
