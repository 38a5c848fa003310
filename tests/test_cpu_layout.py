"""prefer_cpu_layout: fp32 CPU linears packed for oneDNN, or multiplied a row at a time in row blocks
(split_gemv), compute what they did."""

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.layers import linear
from engine.layers.linear import Linear, make_linear, onednn_available, prefer_cpu_layout, split_gemv

ONEDNN = [pytest.param(True, marks=pytest.mark.skipif(not onednn_available(), reason="no oneDNN packed linear")),
          False]


@pytest.fixture(autouse=True)
def two_threads() -> Iterator[None]:
    """Row blocks follow the thread count: fix it at 2 (CI's cores) whatever machine runs the tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ONEDNN, ids=["onednn", "no-onednn"])
def onednn(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(linear, "onednn_available", lambda: request.param)
    return request.param


class Tiny(nn.Module):
    """An embedding with a tied head, a wide and a tall linear, one whose weight is a view of a buffer, and one
    with an odd number of outputs."""

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
        self.odd = make_linear(24, 7, True, None)


def outputs(model: Tiny, x: torch.Tensor) -> list[torch.Tensor]:
    return [model.wide(x), model.tall(model.wide(x)), model.head(x), model.streamed(x), model.odd(x)]


@pytest.mark.parametrize("batch_hint", [1, 8])
@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_outputs_unchanged(rows: int, batch_hint: int, onednn: bool) -> None:
    model = Tiny()
    x = torch.randn(rows, 24)
    with torch.inference_mode():
        before = outputs(model, x)
        prefer_cpu_layout(model, batch_hint=batch_hint)
        after = outputs(model, x)
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_what_moves_and_what_stays(onednn: bool) -> None:
    model = Tiny()
    embed, slot = model.embed.weight.data_ptr(), model.slot.data_ptr()
    assert prefer_cpu_layout(model, batch_hint=4) == (5 if onednn else 4)
    assert model.head.weight is model.embed.weight and model.embed.weight.data_ptr() == embed
    assert model.head.gemv_parts == 2  # the tied head multiplies in row blocks of the embedding's own table
    assert model.streamed.weight.data_ptr() == slot and model.streamed.gemv_parts == 2  # a slot view stays put
    assert model.odd.gemv_parts == 1  # 7 rows do not split in 2: packed with oneDNN, else plain F.linear
    for layer in (model.wide, model.tall, model.odd):
        if onednn:
            assert layer.weight is None and layer.packed is not None
        else:
            assert layer.weight.is_contiguous() and layer.gemv_parts == (1 if layer is model.odd else 2)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN packed linear")
def test_one_sequence_keeps_fp32_dense_and_bf16_is_packed() -> None:
    """At M = 1, row blocks beat oneDNN's packed fp32 weight; an engine of one slot never batches."""
    dense = make_linear(256, 512, False, None)
    prefer_cpu_layout(dense, batch_hint=1)
    assert dense.packed is None and dense.gemv_parts == 2
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        bf16 = make_linear(256, 512, False, None).to(torch.bfloat16)
        prefer_cpu_layout(bf16, batch_hint=1)
        assert bf16.packed is not None


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN packed linear")
def test_packed_linear_takes_any_leading_dims_and_keeps_its_bias() -> None:
    torch.manual_seed(1)
    layer = Linear(16, 40)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.pack_for_onednn(batch_hint=1)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_split_gemv_is_f_linear(parts: int) -> None:
    torch.manual_seed(2)
    x, w, b = torch.randn(1, 40), torch.randn(24, 40), torch.randn(24)
    torch.testing.assert_close(split_gemv(x, w, b, parts), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_gemv(x, w, None, parts), F.linear(x, w), rtol=1e-5, atol=1e-5)
