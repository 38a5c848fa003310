"""Public entry points: pick the kernel variant for the tensors' device.

- CPU tensors: the torch references (`F.linear` on the int8 weight cast to x's dtype), or for a few rows
  torch's own int8-weight CPU kernel, and for many rows of fp32 a bf16 product where the CPU has bf16 math;
- CUDA, CC >= 8.0: tensor-core kernels (fp16/bf16 dots, int8 mma);
- CUDA, CC 6.1-7.5: Pascal/Turing-safe kernels (fp32 math, dp4a); bf16 activations are upcast to fp32 around
  them, as these GPUs have no bf16 arithmetic;
- CUDA below 6.1, or no triton: the torch references, with one logged warning saying why.

An unsupported GPU thus gets slow but correct numbers, never a kernel it cannot run.
"""

import contextlib
import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ._common import HAS_TRITON, Backend, check_linear_args
from .attention import decode_attention_ref, decode_attention_triton
from .quant import quantize_activation_per_token_ref, quantize_activation_per_token_triton
from .w8a8 import w8a8_linear_ref, w8a8_linear_triton
from .w8a16 import w8a16_linear_ref, w8a16_linear_triton

log = logging.getLogger(__name__)

MAX_OFFSET = 2**31 - 1
"""The kernels index their operands with 32-bit offsets: a product whose weight, or whose rows times the row
length (times 8, the most split-K partial sums), could pass this runs in blocks of weight rows or of x's rows
that do not (an int8 LM head of 128k words at hidden 16384, scoring thousands of tokens at once)."""

W8A16_MAX_M = 16
"""`int8_linear` uses W8A16 up to this many rows (decode: memory-bound, so int8 weights at DRAM speed win) and
W8A8 above (prefill: compute-bound, so int8 tensor cores / dp4a win). Provisional: to be set from
`benchmarks/bench_kernels.py` on real GPUs."""


# torch._weight_int8pack_mm (private, CPU) takes int8 weights and bf16 activations and accumulates in fp32; up to
# this many rows it beats dequantizing the weight, measured on the 2-core CI machine with 1 thread (M = 1): 5-19x
# at 768x768 to 11008x4096, and still 1.6x at 256x688. fp32 activations go through it rounded to bf16 (its own fp32
# path is 3-6x slower than dequantizing on small shapes): the rounding is below int8's. Not for fp16: it takes
# the scales in x's dtype, and small ones underflow fp16. K must be a multiple of 16 (torch 2.13: other K give
# inf or crash).
_INT8PACK_MAX_ROWS = 32


@functools.cache
def _cpu_has_bf16_math() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16, which AMX CPUs have too)."""
    is_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return is_bf16 is not None and is_bf16()


@functools.cache
def _warn_once(reason: str) -> None:
    log.warning("vramlite kernels: %s; using the torch reference kernels (slow)", reason)


@functools.cache
def backend_for(device: torch.device) -> Backend:
    """The kernel variants for `device` (cached per device)."""
    if device.type != "cuda":
        return Backend.REFERENCE
    if not HAS_TRITON:
        _warn_once("triton is not installed")
        return Backend.REFERENCE
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 0):
        return Backend.TENSORCORE
    if (major, minor) >= (6, 1):
        return Backend.PASCAL
    _warn_once(f"compute capability {major}.{minor} is below 6.1 (no dp4a), too old for the Triton kernels")
    return Backend.REFERENCE


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make `device` the current GPU while launching: Triton launches on the current one (and its stream),
    whichever GPU holds the operands, and its tuner times there."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _rows(x: torch.Tensor, backend: Backend) -> torch.Tensor:
    """x [..., K] as contiguous rows [M, K]; bf16 upcast to fp32 on Pascal/Turing, which lack bf16 math."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return rows.float() if backend is Backend.PASCAL and rows.dtype == torch.bfloat16 else rows


def _w8a16_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The reference, or on the CPU a faster way with the same rounding of fp32 activations to bf16:

    - up to `_INT8PACK_MAX_ROWS` rows (decode), torch's int8-weight kernel;
    - more rows (prefill) of fp32 on a CPU with bf16 math, x and the int8 weight (exact in bf16) multiplied in
      bf16, the scale applied after in fp32. On 2 Intel Xeon cores (AMX) at 500 rows, 4x faster than the fp32
      product of the reference (a 130M LLaMA's weights), the same error as the decode rows'.
    """
    k = x.shape[-1]
    rows = x.numel() // k
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
        return w8a16_linear_ref(x, qweight, scale, bias)
    int8pack = getattr(torch, "_weight_int8pack_mm", None)
    if int8pack is not None and k % 16 == 0 and 0 < rows <= _INT8PACK_MAX_ROWS:
        y = int8pack(x.reshape(rows, k).to(torch.bfloat16).contiguous(), qweight.contiguous(),
                     scale.to(torch.bfloat16)).to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], qweight.shape[0])
    if x.dtype == torch.float32 and rows > _INT8PACK_MAX_ROWS and _cpu_has_bf16_math():
        y = F.linear(x.to(torch.bfloat16), qweight.to(torch.bfloat16)).float().mul_(scale)
        return y if bias is None else y.add_(bias)
    return w8a16_linear_ref(x, qweight, scale, bias)


def _linear(reference: Callable[..., torch.Tensor], kernel: Callable[..., torch.Tensor], x: torch.Tensor,
            qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """`reference` on the CPU / old GPUs, else the device's `kernel` variant, on operands `check_linear_args`
    passed (checked once per call of a public entry point: a decode step makes hundreds)."""
    backend = backend_for(x.device)
    if backend is Backend.REFERENCE:
        return reference(x, qweight, scale, bias)
    with _on_device(x.device):
        y = _in_blocks(kernel, _rows(x, backend), qweight, scale, bias, backend)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _in_blocks(kernel: Callable[..., torch.Tensor], rows: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None, backend: Backend) -> torch.Tensor:
    """`kernel` on blocks of the weight's rows, then of x's rows, each small enough for 32-bit offsets."""
    n, k = qweight.shape
    n_block = max(1, MAX_OFFSET // k)
    if n > n_block:
        return torch.cat([_in_blocks(kernel, rows, qweight[i : i + n_block], scale[i : i + n_block],
                                     None if bias is None else bias[i : i + n_block], backend)
                          for i in range(0, n, n_block)], dim=1)
    m_block = max(1, MAX_OFFSET // (8 * max(n, k)))
    if len(rows) > m_block:
        return torch.cat([kernel(rows[i : i + m_block], qweight, scale, bias, backend=backend)
                          for i in range(0, len(rows), m_block)])
    return kernel(rows, qweight, scale, bias, backend=backend)


def w8a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x · (qweight ∘ scale[:, None])ᵀ (+ bias) for x [..., K]: int8 weights [N, K], float activations."""
    n, _ = check_linear_args(x, qweight, scale, bias)
    return _linear(_w8a16_reference, w8a16_linear_triton, x, qweight, scale, bias, n)


def w8a8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Like `w8a16_linear`, but x is first quantized per token to int8 and the GEMM runs in int8."""
    n, _ = check_linear_args(x, qweight, scale, bias)
    return _linear(w8a8_linear_ref, w8a8_linear_triton, x, qweight, scale, bias, n)


def quantize_activation_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8 quantization of x [..., K], one absmax scale per token: (int8 [..., K], fp32 scale [...])."""
    backend = backend_for(x.device)
    if backend is Backend.REFERENCE:
        return quantize_activation_per_token_ref(x)
    with _on_device(x.device):
        q, scale = quantize_activation_per_token_triton(_rows(x, backend))
    return q.reshape(x.shape), scale.reshape(x.shape[:-1])


def int8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The int8-weight linear layer: W8A16 for up to `W8A16_MAX_M` rows of x, W8A8 for more.

    The reference backend always takes W8A16: on CPU it is as fast and has no activation-quantization error.
    """
    n, k = check_linear_args(x, qweight, scale, bias)
    if x.numel() // k <= W8A16_MAX_M or backend_for(x.device) is Backend.REFERENCE:
        return _linear(_w8a16_reference, w8a16_linear_triton, x, qweight, scale, bias, n)
    return _linear(w8a8_linear_ref, w8a8_linear_triton, x, qweight, scale, bias, n)


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, scale: float, max_length: int | None = None) -> torch.Tensor:
    """One query per sequence, q [B, heads, D], over its slot's cache [slots, kv_heads, positions, D], positions
    0..positions[b] of slot slots[b], the longest at most `max_length` (`vramlite.kernels.attention`);
    [B, heads, D] in q's dtype. Every Triton backend takes bf16 here: the kernel only converts it, its math is
    fp32."""
    backend = backend_for(q.device)
    if backend is Backend.REFERENCE:
        return decode_attention_ref(q, cache_k, cache_v, slots, positions, scale)
    with _on_device(q.device):
        return decode_attention_triton(q, cache_k, cache_v, slots, positions, scale, max_length)
