"""The W8A8 Triton kernel against its torch reference and against the unquantized product."""

import pytest
import torch
from kernel_testing import BACKENDS, ROWS, SHAPES, VARIANTS, assert_close_to, linear_operands, skip_unrunnable

from vramlite.kernels._common import Backend
from vramlite.kernels.quant import quantize_activation_per_token_ref
from vramlite.kernels.w8a8 import _configs, w8a8_linear_ref, w8a8_linear_triton

triton = pytest.importorskip("triton")

SMALL = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("backend,dtype", VARIANTS)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_matches_ref(
    m: int, n: int, k: int, dtype: torch.dtype, backend: Backend, with_bias: bool, device: str
) -> None:
    skip_unrunnable(backend)
    x, qweight, scale, bias, _ = linear_operands(m, n, k, dtype, device, with_bias)
    y = w8a8_linear_triton(x, qweight, scale, bias, backend=backend, config=SMALL)
    # Same int8 codes (bar GPU division ties, one step of one code), exact int32 sums, same epilogue order.
    assert_close_to(y, w8a8_linear_ref(x.double(), qweight, scale.double(), bias), dtype)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_within_quantization_error_of_float_product(backend: Backend, device: str) -> None:
    skip_unrunnable(backend)
    x, qweight, scale, bias, w = linear_operands(17, 70, 130, torch.float32, device, with_bias=True)
    x[0, 5] = 40.0  # outlier token
    x[1] = 0.0  # all-zero token
    y = w8a8_linear_triton(x, qweight, scale, bias, backend=backend)
    exact = x.double() @ w.double().T + bias.double()
    # x·w - x̂·ŵ = x·(w - ŵ) + (x - x̂)·ŵ, with |w - ŵ| <= w_scale/2 and |x - x̂| <= x_scale/2 per element.
    _, x_scale = quantize_activation_per_token_ref(x)
    w_hat = qweight.double() * scale.double()[:, None]
    bound = x.double().abs().sum(1, keepdim=True) * scale.double() / 2
    bound += x_scale.double()[:, None] / 2 * w_hat.abs().sum(1)
    assert torch.isfinite(y).all()
    assert ((y.double() - exact).abs() <= bound * (1 + 1e-4) + 1e-5).all()
    assert (y[1] == bias).all()


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_every_config_matches_ref(backend: Backend, device: str) -> None:
    skip_unrunnable(backend)
    x, qweight, scale, bias, _ = linear_operands(17, 70, 130, torch.float16, device, with_bias=True)
    expected = w8a8_linear_ref(x.double(), qweight, scale.double(), bias)
    for config in _configs(backend):
        assert_close_to(w8a8_linear_triton(x, qweight, scale, bias, backend=backend, config=config), expected,
                        torch.float16)


def test_no_rows(device: str) -> None:
    x, qweight, scale, _, _ = linear_operands(0, 37, 45, torch.float32, device, with_bias=False)
    assert w8a8_linear_triton(x, qweight, scale, backend=Backend.PASCAL).shape == (0, 37)
