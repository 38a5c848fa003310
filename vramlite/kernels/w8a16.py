"""W8A16: y = x · (Wq ∘ s)ᵀ (+ bias) with int8 weights and float activations.

Each program dequantizes [BLOCK_N, BLOCK_K] int8 weight tiles inside its K loop and applies the per-channel scale
once, in the epilogue. Decode (M = 1..16) is memory-bound, so the goal is int8 weight bytes at DRAM speed (about
2x fp16): split-K spreads K over SPLIT_K programs per output tile so a handful of rows still fills the GPU; each
split writes fp32 partials that one deterministic `sum` reduces (no atomics, so tuning may rerun it freely).

Two ways to multiply a tile:
- tensor cores (`tl.dot` in fp16/bf16, fp32 accumulate) for fp16/bf16 x on CC >= 8.0;
- fp32 multiply-and-reduce, for Pascal/Turing (fp16 math at 1/64 rate on Pascal) and for fp32 x anywhere, and
  tried by the tuner for up to GEMV_ROWS rows on tensor-core GPUs too. BLOCK_M follows M down to 1 here: no
  wasted math on padding rows.
"""

import functools

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, Backend, check_linear_launch, jit, launch, run_tuned, tl

if HAS_TRITON:
    import triton


@jit
def _exact_float(w, dtype: tl.constexpr):
    """int8 w (|w| <= 128) as `dtype`, exactly. fp16 and fp32 by bit pattern, not by a conversion instruction
    (I2F), which issues at a quarter of the integer rate: in the sm_90 code of the tile an H200 tuned for one row,
    64 I2F per thread per K step came to as many cycles as that step's weights take from DRAM. 0x6480 + w is the
    fp16 bit pattern of 1152 + w (fp16 counts in ones from 1024 to 2048), 0x4B000080 + w the fp32 one of
    2^23 + 128 + w. (Triton lowers int8 to bf16 without I2F already.)"""
    if dtype == tl.float16:
        out = (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    elif dtype == tl.float32:
        out = (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        out = w.to(dtype)
    return out


@jit
def _w8a16_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ys, stride_ym,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # This split's share of K, in whole BLOCK_K tiles; trailing splits may get nothing and then write zeros.
    k_tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = pid_k * k_tiles * BLOCK_K
    # The fp32 path accumulates products elementwise and reduces over K once, after the loop.
    acc = tl.zeros((BLOCK_M, BLOCK_N) if USE_DOT else (BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for kt in range(0, k_tiles):
        offs_k = k_begin + kt * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(_exact_float(w, x.dtype)), acc)
        else:
            acc += x.to(tl.float32)[:, None, :] * _exact_float(w, tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)
    acc = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:  # added by split 0 only
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[None, :]
    y_ptrs = y_ptr + pid_k * stride_ys + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_m(m: int, use_dot: bool) -> int:
    rows = triton.next_power_of_2(max(m, 1))
    if use_dot:
        return min(max(rows, 16), 64)  # tl.dot wants >= 16 rows
    return min(rows, 16)


def _fp32_tiles(block_m: int, space: tuple[tuple[int, int, int], ...], stages: int) -> list[tuple]:
    """fp32 multiply-and-reduce tiles of 8192 products: BLOCK_K follows BLOCK_M * BLOCK_N down."""
    return [(False, block_m, n, min(8192 // (block_m * n), 256), split, warps, stages) for n, split, warps in space]


GEMV_ROWS = 4  # up to this many rows, tensor-core GPUs also try the fp32 tiles: no padding to 16 rows


@functools.cache  # once per shape class, not on every call of a decode step
def _configs(use_dot: bool, m: int) -> tuple["triton.Config", ...]:
    """The tuning space for M = m: tensor-core tiles (and, for a few rows, fp32 tiles too), or fp32 tiles of 8192
    products alone: 32 KiB of shared memory to reduce (GTX 1060: 48 KiB per block), 64 or 32 accumulators per
    thread. Each config carries its path (USE_DOT) and BLOCK_M."""
    fp32_space = ((32, 1, 4), (64, 1, 4), (32, 4, 4), (64, 4, 8))  # (BLOCK_N, SPLIT_K, num_warps)
    if use_dot:
        block_m = _block_m(m, True)
        space = [(True, block_m, *tile) for tile in (  # (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
            (64, 128, 1, 4, 4),
            (64, 128, 4, 4, 4),
            (64, 128, 8, 4, 4),
            (64, 256, 4, 4, 3),
            (128, 128, 2, 4, 4),
            (32, 256, 8, 4, 3),
            (128, 256, 1, 8, 3),
            # one program per 16-32 rows and no split: no partials to reduce, so no second kernel at M = 1
            (32, 256, 1, 4, 4),
            (16, 512, 1, 4, 3),
            (32, 512, 2, 4, 3),
        )]
        if m <= GEMV_ROWS:
            space += _fp32_tiles(_block_m(m, False), ((16, 1, 4), *fp32_space), 3)
    else:  # the K reduction after the loop stages the BLOCK_M*BLOCK_N*BLOCK_K products in shared memory
        space = _fp32_tiles(_block_m(m, False), fp32_space, 2)
    return tuple(
        triton.Config({"USE_DOT": dot, "BLOCK_M": bm, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": split},
                      num_warps=warps, num_stages=stages)
        for dot, bm, n, k, split, warps, stages in space
    )


def w8a16_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = Backend.TENSORCORE,
    config: "triton.Config | None" = None,
) -> torch.Tensor:
    """W8A16 on x [M, K] with `backend`'s kernel variants; `config` overrides tuning (tests)."""
    n, k = check_linear_launch(x, qweight, scale, bias, backend)
    m = x.shape[0]
    use_dot = backend is Backend.TENSORCORE and x.dtype != torch.float32

    def run(cfg: "triton.Config") -> torch.Tensor:
        split_k = cfg.kwargs["SPLIT_K"]
        if split_k == 1:
            y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        else:
            y = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]), triton.cdiv(n, cfg.kwargs["BLOCK_N"]), split_k)
        launch(
            _w8a16_kernel, grid, cfg,
            x, qweight, scale, scale if bias is None else bias, y,  # bias_ptr is unread without HAS_BIAS
            m, n, k,
            x.stride(0), qweight.stride(0), y.stride(0) if split_k > 1 else 0, y.stride(-2),
            HAS_BIAS=bias is not None,
        )
        return y if split_k == 1 else y.sum(dim=0).to(x.dtype)

    rows = min(triton.next_power_of_2(max(m, 1)), 64)  # the configs' shape class
    key = ("w8a16", x.device, x.dtype, use_dot, rows, n, k)
    return run_tuned(x, n, key, _configs(use_dot, rows), run, config)


def w8a16_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference, and the CPU path: `F.linear` on the int8 weight cast to x's dtype, then the scale.

    fp16 computes in fp32 (Σ x·q before scaling can overflow fp16); any float dtype works (float64 for tests).
    """
    dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
    y = F.linear(x.to(dtype), qweight.to(dtype)) * scale.to(dtype)
    if bias is not None:
        y = y + bias.to(dtype)
    return y.to(x.dtype)
