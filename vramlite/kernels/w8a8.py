"""W8A8: per-token int8 activations times per-channel int8 weights, int32 accumulate, for prefill / large M.

y[m, n] = (Σ_k xq[m, k]·wq[n, k]) · x_scale[m] · w_scale[n] (+ bias[n]). The K loop multiplies int8 tiles exactly
in int32; the two scales (and the bias) are applied once, in the epilogue. Tiles are visited in GROUP_M-row
groups so neighbouring programs reuse weight tiles from L2.

How the int8 tiles are multiplied (`DOT`):
- "mma": `tl.dot` on int8 tensor cores, CC >= 8.0 (Triton cannot lower an int8 dot for sm_61/sm_75);
- "dp4a": Pascal/Turing. Each int32 lane packs 4 int8 of K and `dp4a` (inline PTX, full rate on sm_61+)
  multiplies them and adds to an int32 accumulator: [BLOCK_M, BLOCK_N, BLOCK_K/4] accumulators in registers,
  summed over the last axis after the K loop;
- "dp4a_emulated": the same packing with dp4a done by shifts and multiplies, for the interpreter, which cannot
  run inline PTX. It is what tests the packing on CPU.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._common import (
    HAS_TRITON,
    Backend,
    check_linear_launch,
    interpreting,
    jit,
    launch,
    run_tuned,
    tl,
)
from .quant import quantize_activation_per_token_ref, quantize_activation_per_token_triton

if HAS_TRITON:
    import triton


@jit
def _load_int8x4(ptr, offs_r, stride_r, mask_r, offs_k4, K):
    """[R, BLOCK_K/4] int32 lanes, lane j of row r packing int8 [r, offs_k4[j] : offs_k4[j] + 4], little-endian
    as dp4a reads them; bytes past K are 0. Four byte loads: any K and any alignment work."""
    rows = ptr + offs_r[:, None] * stride_r + offs_k4[None, :]
    packed = tl.zeros((offs_r.shape[0], offs_k4.shape[0]), dtype=tl.int32)
    for i in tl.static_range(4):
        mask = mask_r[:, None] & (offs_k4[None, :] + i < K)
        byte = tl.load(rows + i, mask=mask, other=0).to(tl.int32) & 0xFF
        packed |= byte << (8 * i)
    return packed


@jit
def _dp4a(a, b, c, EMULATE: tl.constexpr):
    """c + Σ_i a.byte[i]·b.byte[i] over the 4 signed bytes packed in each int32 lane (a, b, c broadcast)."""
    if EMULATE:
        for i in tl.static_range(4):
            c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)  # << then >> sign-extends byte i
    else:
        c = tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    return c


@jit
def _w8a8_kernel(
    xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_m
    pid_n = (pid % pids_per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if DOT == "mma":
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            a = tl.load(xq_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0)
            b = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                        mask=mask_n[:, None] & mask_k[None, :], other=0)
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    else:
        # dp4a accumulates in place: one [BLOCK_M, BLOCK_N, BLOCK_K/4] accumulator, reduced once at the end.
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 4), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k4 = k0 + 4 * tl.arange(0, BLOCK_K // 4)
            a = _load_int8x4(xq_ptr, offs_m, stride_xm, mask_m, offs_k4, K)
            b = _load_int8x4(w_ptr, offs_n, stride_wn, mask_n, offs_k4, K)
            acc3 = _dp4a(a[:, None, :], b[None, :, :], acc3, DOT == "dp4a_emulated")
        acc = tl.sum(acc3, axis=2)
    x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@functools.cache  # once per backend, not on every call
def _configs(backend: Backend) -> tuple["triton.Config", ...]:
    """The tuning space per backend: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)."""
    if backend is Backend.TENSORCORE:
        space = [
            (128, 128, 128, 8, 3),
            (128, 256, 128, 8, 3),
            (64, 128, 128, 4, 4),
            (128, 64, 128, 4, 4),
            (64, 64, 128, 4, 4),
            (32, 64, 128, 4, 4),
        ]
    else:  # BLOCK_M*BLOCK_N*BLOCK_K/4 dp4a lanes live in registers: ~64 per thread; no cp.async to pipeline
        space = [
            (32, 32, 32, 4, 1),
            (64, 64, 16, 8, 1),
            (64, 32, 32, 8, 1),
            (32, 64, 32, 8, 1),
        ]
    return tuple(
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
        for bm, bn, bk, warps, stages in space
    )


def _dot(backend: Backend) -> str:
    if backend is Backend.TENSORCORE:
        return "mma"
    return "dp4a_emulated" if interpreting() else "dp4a"


def w8a8_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: Backend = Backend.TENSORCORE,
    config: "triton.Config | None" = None,
) -> torch.Tensor:
    """W8A8 on x [M, K]: quantize x per token (Triton), then the int8 GEMM; `config` overrides tuning (tests)."""
    n, k = check_linear_launch(x, qweight, scale, bias, backend)
    xq, xs = quantize_activation_per_token_triton(x)
    m = x.shape[0]
    dot = _dot(backend)

    def run(cfg: "triton.Config") -> torch.Tensor:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        grid = (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(n, cfg.kwargs["BLOCK_N"]),)
        launch(
            _w8a8_kernel, grid, cfg,
            xq, xs, qweight, scale, scale if bias is None else bias, y,  # bias_ptr is unread without HAS_BIAS
            m, n, k,
            xq.stride(0), qweight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, DOT=dot,
        )
        return y

    # Bucketing M by powers of two bounds the tuning runs over prefill lengths.
    key = ("w8a8", x.device, x.dtype, dot, triton.next_power_of_2(m), n, k)
    return run_tuned(x, n, key, _configs(backend), run, config)


def _int8_matmul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] · b [N, K]ᵀ of int8: exact int32 on CPU; on CUDA via fp32, exact while |sums| < 2^24."""
    if a.device.type == "cpu":
        return torch._int_mm(a, b.t())
    return F.linear(a.float(), b.float())


def w8a8_linear_ref(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Torch reference of `w8a8_linear_triton` for x [..., K], same quantization and epilogue order."""
    return w8a8_linear_with(lambda xq: _int8_matmul_ref(xq, qweight), x, scale, bias)


def w8a8_linear_with(
    int8_matmul: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`w8a8_linear_ref` with another product of the weight: `int8_matmul` maps x's codes [M, K] (int8) to the
    exact sums [M, N] (int32, or fp32 as `_int8_matmul_ref` gives them); quantization and epilogue are the
    reference's."""
    xq, xs = quantize_activation_per_token_ref(x)
    k = x.shape[-1]
    acc = int8_matmul(xq.reshape(-1, k)).float()
    y = acc * xs.reshape(-1, 1) * scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], acc.shape[-1])
