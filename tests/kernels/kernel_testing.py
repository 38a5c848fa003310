"""Helpers shared by the kernel tests (a plain module: conftest.py is not importable by name)."""

import pytest
import torch

from vramlite.kernels._common import Backend
from vramlite.kernels.quant import quantize_weight

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(37, 45), (70, 130)]  # (N, K), not multiples of any block
ROWS = [1, 3, 17]
BACKENDS = [Backend.TENSORCORE, Backend.PASCAL]
# The Pascal variants take no bf16 (vramlite.kernels.dispatch upcasts it to fp32 for them).
VARIANTS = [
    pytest.param(b, d, id=f"{b.value}-{str(d).removeprefix('torch.')}")
    for b in BACKENDS
    for d in DTYPES
    if not (b is Backend.PASCAL and d == torch.bfloat16)
]


def skip_unrunnable(backend: Backend) -> None:
    """Skip the tensor-core variants on a GPU below CC 8.0."""
    if HAS_CUDA and backend is Backend.TENSORCORE and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tensor-core variants need CC >= 8.0")


def linear_operands(
    m: int, n: int, k: int, dtype: torch.dtype, device: str, with_bias: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(x [m, k], qweight, scale, bias or None, float weight) with unevenly scaled rows."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * torch.logspace(-2, 0, n)[:, None]
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    qweight, scale = quantize_weight(w)
    return (
        x.to(device),
        qweight.to(device),
        scale.to(device),
        None if bias is None else bias.to(device),
        w.to(device),
    )


def assert_close_to(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """y (in `dtype`, from fp32 accumulation) against a float64 expectation, within one rounding to `dtype`."""
    assert y.dtype == dtype and y.shape == expected.shape
    tol = {
        torch.float32: {"rtol": 1e-5, "atol": 1e-4},
        torch.float16: {"rtol": 2e-3, "atol": 2e-3},
        torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    }[dtype]
    torch.testing.assert_close(y.double(), expected.double(), **tol)
