"""Weight quantization (torch) and the per-token activation quantization kernel."""

import pytest
import torch

from vramlite.kernels.quant import (
    dequantize_weight,
    quantize_activation_per_token_ref,
    quantize_activation_per_token_triton,
    quantize_weight,
)

pytest.importorskip("triton")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_within_half_step(w: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> None:
    err = (w.float() - dequantize_weight(qweight, scale)).abs()
    bound = scale[:, None] / 2 + w.float().abs() * 2**-22  # + fp32 rounding of w / scale and q * scale
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item()}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_weight_error_is_at_most_half_a_step(dtype: torch.dtype) -> None:
    w = (torch.randn(70, 130) * torch.logspace(-3, 2, 70)[:, None]).to(dtype)
    qweight, scale = quantize_weight(w)
    assert qweight.dtype == torch.int8 and qweight.shape == (70, 130)
    assert scale.dtype == torch.float32 and scale.shape == (70,)
    assert qweight.abs().max() == 127  # absmax maps to the full range
    _assert_within_half_step(w, qweight, scale)


def test_zero_row_and_outlier_column_stay_finite() -> None:
    w = torch.randn(37, 45)
    w[:, 3] = 1e4
    w[5] = 0.0
    qweight, scale = quantize_weight(w)
    deq = dequantize_weight(qweight, scale)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.isfinite(deq).all()
    assert (qweight[5] == 0).all() and (deq[5] == 0).all()
    _assert_within_half_step(w, qweight, scale)


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(2, 3, dtype=torch.int32)], ids=["1d", "int"])
def test_quantize_weight_rejects(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="2-D float"):
        quantize_weight(bad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 45), (3, 130), (17, 45), (2, 2100)], ids=str)  # 2100: two K blocks
def test_activation_kernel_matches_ref(shape: tuple[int, int], dtype: torch.dtype, device: str) -> None:
    x = torch.randn(shape, device=device).to(dtype) * 3
    x[0, 1] = 50.0  # outlier
    if shape[0] > 1:
        x[1] = 0.0  # all-zero token
    q, scale = quantize_activation_per_token_triton(x)
    q_ref, scale_ref = quantize_activation_per_token_ref(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (shape[0],)
    torch.testing.assert_close(scale, scale_ref, rtol=0, atol=0)
    # The GPU's fp32 division may land on the other side of a rounding tie (either side is half a step away).
    assert (q.int() - q_ref.int()).abs().max() <= (1 if device == "cuda" else 0)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    _assert_within_half_step(x, q, scale)


def test_activation_kernel_rejects_non_contiguous(device: str) -> None:
    with pytest.raises(ValueError, match="contiguous"):
        quantize_activation_per_token_triton(torch.randn(45, 3, device=device).t())
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        quantize_activation_per_token_triton(torch.zeros(3, 45, dtype=torch.int8, device=device))
