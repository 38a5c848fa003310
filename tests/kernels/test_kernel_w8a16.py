"""The W8A16 Triton kernel against its torch reference."""

import pytest
import torch
from kernel_testing import (
    BACKENDS,
    DTYPES,
    HAS_CUDA,
    ROWS,
    SHAPES,
    VARIANTS,
    assert_close_to,
    linear_operands,
    skip_unrunnable,
)

from vramlite.kernels import w8a16
from vramlite.kernels._common import Backend
from vramlite.kernels.w8a16 import GEMV_ROWS, _block_m, _configs, w8a16_linear_ref, w8a16_linear_triton

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


def _small(backend: Backend, dtype: torch.dtype, m: int) -> "triton.Config":
    """Small tiles so the odd shapes take several N tiles, K tiles and splits, all with ragged edges."""
    use_dot = backend is Backend.TENSORCORE and dtype != torch.float32
    return triton.Config({"USE_DOT": use_dot, "BLOCK_M": _block_m(m, use_dot), "BLOCK_N": 32, "BLOCK_K": 32,
                          "SPLIT_K": 2}, num_warps=4)


def _skip_interpreter_bf16_dot(backend: Backend, dtype: torch.dtype) -> None:
    if not HAS_CUDA and backend is Backend.TENSORCORE and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bf16 tl.dot operands as raw int16 bits (GPU tests cover it)")


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,dtype", VARIANTS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_matches_ref(
    m: int, n: int, k: int, dtype: torch.dtype, backend: Backend, with_bias: bool, device: str
) -> None:
    skip_unrunnable(backend)
    _skip_interpreter_bf16_dot(backend, dtype)
    x, qweight, scale, bias, _ = linear_operands(m, n, k, dtype, device, with_bias)
    y = w8a16_linear_triton(x, qweight, scale, bias, backend=backend, config=_small(backend, dtype, m))
    expected = w8a16_linear_ref(x.double(), qweight, scale.double(), None if bias is None else bias.double())
    assert_close_to(y, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("m", [1, 17])
def test_every_config_matches_ref(m: int, backend: Backend, device: str) -> None:
    skip_unrunnable(backend)
    x, qweight, scale, bias, _ = linear_operands(m, 70, 130, torch.float16, device, with_bias=True)
    expected = w8a16_linear_ref(x.double(), qweight, scale.double(), bias.double())
    configs = _configs(backend is Backend.TENSORCORE, m)
    assert backend is Backend.PASCAL or m > GEMV_ROWS or any(not c.kwargs["USE_DOT"] for c in configs)
    for config in configs:
        y = w8a16_linear_triton(x, qweight, scale, bias, backend=backend, config=config)
        assert_close_to(y, expected, torch.float16)


def test_no_rows(device: str) -> None:
    x, qweight, scale, _, _ = linear_operands(0, 37, 45, torch.float32, device, with_bias=False)
    assert w8a16_linear_triton(x, qweight, scale, backend=Backend.PASCAL).shape == (0, 37)


@triton.jit
def _exact_float_kernel(w_ptr, out_ptr, DTYPE: tl.constexpr):
    offs = tl.arange(0, 256)
    # through the module: without a GPU, conftest swaps its jit functions for interpreted ones
    tl.store(out_ptr + offs, w8a16._exact_float(tl.load(w_ptr + offs), DTYPE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_int8_value_converts_exactly(dtype: torch.dtype, device: str) -> None:
    """The conversion the W8A16 loop uses (bit patterns for fp16 and fp32, not I2F) at all 256 int8 values."""
    if not HAS_CUDA and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter keeps bf16 as raw int16 bits (GPU tests cover it)")
    kernel = _exact_float_kernel
    if not HAS_CUDA:
        from triton.runtime.interpreter import InterpretedFunction

        kernel = InterpretedFunction(_exact_float_kernel.fn)
    w = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).to(device)
    out = torch.empty(256, dtype=dtype, device=device)
    triton_dtype = {torch.float16: tl.float16, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}[dtype]
    kernel[(1,)](w, out, DTYPE=triton_dtype)
    assert torch.equal(out.cpu(), w.cpu().to(dtype))
