"""The compiled kernels on a real GPU, at model sizes, through the public entry points (`pytest -m gpu`)."""

import pytest
import torch

import vramlite.kernels
from vramlite.kernels import dispatch
from vramlite.kernels._common import Backend
from vramlite.kernels.w8a8 import w8a8_linear_triton
from vramlite.kernels.w8a16 import w8a16_linear_ref, w8a16_linear_triton

pytestmark = pytest.mark.gpu

N = K = 4096


def _capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


def _dtypes() -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16, torch.float32] if _capability() >= (8, 0) else [torch.float16, torch.float32]


def _operands(m: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(m)
    w = torch.randn(N, K, device="cuda", generator=gen) / K**0.5
    qweight, scale = vramlite.kernels.quantize_weight(w)
    x = torch.randn(m, K, device="cuda", generator=gen).to(dtype)
    bias = torch.randn(N, device="cuda", generator=gen).to(dtype)
    return x, qweight, scale, bias


def _assert_close(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    rtol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=rtol)


def test_dispatch_picks_the_variant_for_this_gpu() -> None:
    cc = _capability()
    expected = Backend.TENSORCORE if cc >= (8, 0) else Backend.PASCAL if cc >= (6, 1) else Backend.REFERENCE
    assert dispatch.backend_for(torch.device("cuda", torch.cuda.current_device())) is expected


@pytest.mark.parametrize("m", [1, 16, 256])
def test_w8a16(m: int) -> None:
    for dtype in _dtypes():
        x, qweight, scale, bias = _operands(m, dtype)
        expected = w8a16_linear_ref(x.double(), qweight, scale.double(), bias.double())
        _assert_close(vramlite.kernels.w8a16_linear(x, qweight, scale, bias), expected, dtype)


@pytest.mark.parametrize("m", [16, 256, 2048])
def test_w8a8(m: int) -> None:
    for dtype in _dtypes():
        x, qweight, scale, bias = _operands(m, dtype)
        xq, xs = vramlite.kernels.quantize_activation_per_token(x)  # the codes w8a8_linear uses: an exact reference
        expected = (xq.double() @ qweight.double().T) * xs.double()[:, None] * scale.double() + bias.double()
        _assert_close(vramlite.kernels.w8a8_linear(x, qweight, scale, bias), expected, dtype)


@pytest.mark.parametrize("m", [1, 16, 17, 256])
def test_int8_linear(m: int) -> None:
    x, qweight, scale, bias = _operands(m, torch.float16)
    y = vramlite.kernels.int8_linear(x, qweight, scale, bias)
    fp = x.double() @ vramlite.kernels.dequantize_weight(qweight, scale).double().T + bias.double()
    assert (y.double() - fp).abs().max() <= 0.05 * fp.abs().max()  # W8A8's activation error included


def test_pascal_variants_on_this_gpu() -> None:
    """dp4a and the fp32 W8A16 run on any CC >= 6.1: on a newer GPU they are checked here too."""
    x, qweight, scale, bias = _operands(64, torch.float32)
    expected = w8a16_linear_ref(x.double(), qweight, scale.double(), bias.double())
    _assert_close(w8a16_linear_triton(x, qweight, scale, bias, backend=Backend.PASCAL), expected, torch.float32)
    xq, xs = vramlite.kernels.quantize_activation_per_token(x)
    exact = (xq.double() @ qweight.double().T) * xs.double()[:, None] * scale.double() + bias.double()
    _assert_close(w8a8_linear_triton(x, qweight, scale, bias, backend=Backend.PASCAL), exact, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_operands_gpu_not_the_current_one() -> None:
    """Triton launches on the current GPU: the entry points make the operands' one current for the call."""
    with torch.cuda.device(1):
        x, qweight, scale, bias = _operands(24, torch.float16)
    on0 = [t.to("cuda:0") for t in (x, qweight, scale, bias)]
    with torch.cuda.device(1):  # the operands on GPU 0, the current device 1
        for entry in (vramlite.kernels.w8a16_linear, vramlite.kernels.w8a8_linear):
            y1, y0 = entry(x, qweight, scale, bias), entry(*on0)
            assert y0.device == torch.device("cuda", 0)
            torch.testing.assert_close(y0.cpu(), y1.cpu(), rtol=0, atol=0)


def test_tuner_timer_times_on_the_gpu() -> None:
    from vramlite.kernels._common import gpu_milliseconds

    x = torch.randn(2048, 2048, device="cuda")
    small, large = gpu_milliseconds(lambda: x[:256] @ x[:256].T, reps=5), gpu_milliseconds(lambda: x @ x, reps=5)
    assert 0 < small < large < 1000
