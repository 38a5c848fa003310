"""prefer_cpu_layout: fp32 CPU linears repacked for oneDNN (or stored column-major) compute what they did."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import linear
from engine.layers.linear import Linear, make_linear, onednn_available, prefer_cpu_layout

ONEDNN = [pytest.param(True, marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN packed linear")),
          False]


@pytest.fixture(params=ONEDNN, ids=["onednn", "column-major"])
def onednn(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each test runs with oneDNN packing of every owned weight (where this build has it; the tiny layers here
    are below the fp32 size that is packed by default) and with the column-major fallback."""
    monkeypatch.setattr(linear, "onednn_available", lambda: request.param)
    monkeypatch.setattr(linear, "ONEDNN_FP32_MIN_WEIGHTS", 0)
    return request.param


class Tiny(nn.Module):
    """An embedding with a tied head, a wide and a tall linear, and one whose weight is a view of a buffer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 24)
        self.wide = make_linear(24, 72, True, None)
        self.tall = make_linear(72, 24, False, None)
        self.head = make_linear(24, 50, False, None)
        self.head.weight = self.embed.weight
        self.slot = torch.randn(2 * 24 * 24)
        self.streamed = make_linear(24, 24, False, None)
        self.streamed.weight = nn.Parameter(self.slot[: 24 * 24].view(24, 24), requires_grad=False)


def outputs(model: Tiny, x: torch.Tensor) -> list[torch.Tensor]:
    return [model.wide(x), model.tall(model.wide(x)), model.head(x), model.streamed(x)]


@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_outputs_unchanged(rows: int, onednn: bool) -> None:
    model = Tiny()
    x = torch.randn(rows, 24)
    with torch.inference_mode():
        before = outputs(model, x)
        assert prefer_cpu_layout(model, batch_hint=8) == (2 if onednn else 1) + 1
        after = outputs(model, x)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_what_moves_and_what_stays(onednn: bool) -> None:
    model = Tiny()
    embed, slot = model.embed.weight.data_ptr(), model.slot.data_ptr()
    prefer_cpu_layout(model, batch_hint=4)
    assert model.head.weight is model.embed.weight  # the tied head still reads the embedding's table
    assert model.embed.weight.data_ptr() != embed and not model.head.weight.is_contiguous()  # column-major
    assert model.streamed.weight.data_ptr() == slot  # a view into a buffer keeps its place
    if onednn:
        assert model.wide.weight is None and model.wide.packed is not None
        assert model.tall.weight is None and model.tall.packed is not None
    else:
        assert not model.wide.weight.is_contiguous() and model.tall.weight.is_contiguous()


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN packed linear")
def test_packed_linear_takes_any_leading_dims_and_keeps_its_bias() -> None:
    torch.manual_seed(1)
    layer = Linear(16, 40)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.pack_for_onednn(batch_hint=1)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN packed linear")
def test_small_fp32_layers_stay_dense_and_bf16_ones_are_packed() -> None:
    """oneDNN costs ~10 us a call more than MKL: not worth it for small fp32 weights at M = 1."""
    small, large = make_linear(256, 512, False, None), make_linear(1024, 1024, False, None)
    model = nn.ModuleList([small, large])
    prefer_cpu_layout(model, batch_hint=1)
    assert small.packed is None and not small.weight.is_contiguous()  # column-major
    assert large.packed is not None
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = make_linear(256, 512, False, None).to(torch.bfloat16)
        prefer_cpu_layout(bf16, batch_hint=1)
        assert bf16.packed is not None
