"""Symmetric int8 quantization: per-output-channel weights (torch) and per-token activations (Triton + ref).

Both use one rule, `_quantize_rows`: scale = absmax/127 per row (1.0 for an all-zero row, so nothing divides
by zero), q = x/scale in fp32, clamped to ±127 and rounded half away from zero (which the kernel matches
exactly).
"""

import torch

from ._common import FLOAT_DTYPES, HAS_TRITON, check_kernel_operands, jit, launch, tl

if HAS_TRITON:
    import triton


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [..., K] and fp32 scales [...] of x [..., K], one scale per row (last dim).

    Temporaries stay at two fp32 copies of x: weights are quantized while loading big models."""
    absmax = torch.maximum(x.amax(dim=-1), -x.amin(dim=-1)).float()
    # over a tensor, not the scalar 127: CUDA divides by a scalar as a times 1/b, one ulp off the true quotient
    # that the CPU and the Triton kernel compute (seen on an H200 for 2 of 17 rows)
    scale = torch.where(absmax > 0, absmax / torch.full_like(absmax, 127.0), 1.0)
    v = x.to(torch.float32, copy=True).div_(scale.unsqueeze(-1)).clamp_(-127.0, 127.0)
    v += torch.sign(v).mul_(0.5)
    return v.trunc_().to(torch.int8), scale


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float weight [N, K] per output channel: (qweight int8 [N, K], scale fp32 [N]).

    `w ≈ qweight * scale[:, None]` with |w - dequant| <= scale/2 per element.
    """
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a 2-D float tensor [N, K], got {w.dtype} {tuple(w.shape)}")
    return _quantize_rows(w)


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [N, K] that (qweight, scale) stand for."""
    return (qweight.float() * scale.unsqueeze(-1)).to(dtype)


def quantize_activation_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of the per-token kernel: (int8 [..., K], fp32 scale [...]) with one scale per token."""
    return _quantize_rows(x)


@jit
def _quantize_per_token_kernel(
    x_ptr, q_ptr, scale_ptr,
    K,
    stride_xm, stride_qm,
    BLOCK_K: tl.constexpr,
):
    # One program per row: absmax over the row, then a second pass (mostly from cache) to quantize it.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    amax = tl.max(absmax, axis=0)
    # div_rn: `/` on fp32 compiles to div.full.f32 (up to 2 ulp off); the codes must be the reference's
    scale = tl.where(amax > 0, tl.math.div_rn(amax, 127.0), 1.0)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -127.0), 127.0)
        q = tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int8)  # float->int truncates: rounds half away from 0
        tl.store(q_row + offs_k, q, mask=offs_k < K)
    tl.store(scale_ptr + row, scale)


def _config(k: int) -> "triton.Config":
    block_k = min(triton.next_power_of_2(k), 2048)
    return triton.Config({"BLOCK_K": block_k}, num_warps=8 if block_k >= 2048 else 4, num_stages=1)


def quantize_activation_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token dynamic int8 quantization of x [M, K] (contiguous, fp16/bf16/fp32): (int8 [M, K], fp32 [M])."""
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    check_kernel_operands(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        launch(_quantize_per_token_kernel, (m,), _config(k), x, q, scale, k, x.stride(0), q.stride(0))
    return q, scale

