"""prefer_cpu_layout: CPU float linears kept dense, multiplied a row at a time in row blocks (split_gemv) or
packed for oneDNN, whichever timed fastest, compute what they did; int8 linears packed for oneDNN compute
kernels' W8A8 reference exactly; the choice follows the timings."""

import logging
import time
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vramlite.engine.layers import cpu_layout
from vramlite.engine.layers.cpu_layout import (
    Group,
    candidate_groups,
    onednn_available,
    onednn_int8_available,
    prefer_cpu_layout,
)
from vramlite.engine.layers.linear import SPLIT_GEMV_ROWS, Linear, QuantizedLinear, make_linear, split_gemv
from vramlite.engine.runner import torch_compiles_decode
from vramlite.kernels import quantize_weight
from vramlite.kernels.quant import quantize_activation_per_token_ref
from vramlite.kernels.w8a8 import w8a8_linear_ref
from vramlite.kernels.w8a16 import w8a16_linear_ref

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
    monkeypatch.setattr(cpu_layout, "onednn_available", lambda: request.param)
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


def ranked(*order: str) -> cpu_layout.Timer:
    """A timer under which the layouts rank in `order`, fastest first, at any number of rows."""
    return lambda group, layout, rows: float(order.index(layout) + 1)


def test_what_moves_and_what_stays(onednn: bool) -> None:
    model = Tiny()
    embed, slot = model.embed.weight.data_ptr(), model.slot.data_ptr()
    chosen = prefer_cpu_layout(model, batch_hint=4, timer=ranked("packed", "rows", "dense"))
    assert chosen == ({"packed": 3, "rows": 2} if onednn else {"rows": 4})  # odd: dense is its only layout
    assert model.head.weight is model.embed.weight and model.embed.weight.data_ptr() == embed
    assert model.head.gemv_parts == 2  # the tied head multiplies in row blocks of the embedding's own table
    assert model.streamed.weight.data_ptr() == slot and model.streamed.gemv_parts == 2  # a slot view stays put
    assert model.odd.gemv_parts == 1  # 7 rows do not split in 2: packed with oneDNN, else plain F.linear
    for layer in (model.wide, model.tall, model.odd):
        if onednn:
            assert layer.weight is None and layer.packed is not None
        else:
            assert layer.weight.is_contiguous() and layer.gemv_parts == (1 if layer is model.odd else 2)


def test_dense_fastest_changes_nothing(onednn: bool) -> None:
    model = Tiny()
    chosen = prefer_cpu_layout(model, batch_hint=8, timer=ranked("dense", "rows", "packed"))
    assert chosen == {"dense": 5 if onednn else 4}  # odd has no other layout without oneDNN
    for layer in (model.wide, model.tall, model.head, model.streamed, model.odd):
        assert layer.weight is not None and layer.packed is None and layer.gemv_parts == 1


@pytest.mark.parametrize(("batch_hint", "want"), [(1, "rows"), (8, "packed")])
def test_rows_count_as_dense_beyond_split_gemv_rows(batch_hint: int, want: str) -> None:
    """Row blocks serve inputs of up to SPLIT_GEMV_ROWS rows only: for an engine that batches more, their score
    adds dense's time at `batch_hint` rows, which here loses to packed."""
    times = {"dense": lambda m: 10.0 * m, "rows": lambda m: 1.0, "packed": lambda m: 8.0}
    layer = make_linear(24, 72, False, None)
    calls: list[tuple[str, int]] = []

    def timer(group: Group, layout: str, rows: int) -> float:
        calls.append((layout, rows))
        return times[layout](rows)

    if not onednn_available():
        pytest.skip("this torch build has no oneDNN packed linear")
    assert prefer_cpu_layout(layer, batch_hint=batch_hint, timer=timer) == {want: 1}
    assert ("rows", 8) not in calls
    assert (layer.packed is not None) == (want == "packed") and layer.gemv_parts == (2 if want == "rows" else 1)


@pytest.mark.parametrize("layout", ["dense", "rows", "packed"])
def test_a_layout_asked_for_goes_wherever_it_applies_untimed(onednn: bool, layout: str) -> None:
    def timer(group: Group, lay: str, rows: int) -> float:
        raise AssertionError("a layout asked for is not timed")

    model = Tiny()
    chosen = prefer_cpu_layout(model, batch_hint=4, layout=layout, timer=timer)
    can = {"dense": [], "rows": ["wide", "tall", "head", "streamed"],
           "packed": ["wide", "tall", "odd"] if onednn else []}[layout]
    for name in ("wide", "tall", "head", "streamed", "odd"):
        layer = getattr(model, name)
        assert (layer.packed is not None) == (layout == "packed" and name in can)
        assert layer.gemv_parts == (2 if layout == "rows" and name in can else 1)
    assert sum(chosen.values()) == (5 if onednn else 4)  # odd has no other layout without oneDNN
    if layout != "dense":
        assert chosen.get(layout, 0) == len(can)


def test_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="'sparse' is not one of auto, dense, rows, packed"):
        prefer_cpu_layout(Tiny(), batch_hint=1, layout="sparse")


def test_groups_by_shape_dtype_and_candidates(onednn: bool) -> None:
    model = Tiny()
    groups = {(g.shape, g.layouts): len(g.members) for g in candidate_groups(model)}
    packed = ("packed",) if onednn else ()
    assert groups == {((72, 24), ("dense", "rows", *packed)): 1, ((24, 72), ("dense", "rows", *packed)): 1,
                      ((50, 24), ("dense", "rows")): 1, ((24, 24), ("dense", "rows")): 1,
                      ((7, 24), ("dense", *packed)): 1}


def test_timing_samples_at_least_one_weight_per_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the sampling budget a group still times its first weight; the layout then goes to all members."""
    monkeypatch.setattr(cpu_layout, "SAMPLE_BYTES", 0)
    model = nn.Sequential(*(make_linear(24, 72, False, None) for _ in range(3)))
    sampled: list[int] = []

    def timer(group: Group, layout: str, rows: int) -> float:
        sampled.append(len(group.sampled))
        return ranked("rows", "dense", "packed")(group, layout, rows)

    assert prefer_cpu_layout(model, batch_hint=1, timer=timer) == {"rows": 3}
    assert set(sampled) == {1} and all(layer.gemv_parts == 2 for layer in model)


@pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN packed linear")
def test_packed_linear_takes_any_leading_dims_and_keeps_its_bias() -> None:
    torch.manual_seed(1)
    layer = Linear(16, 40)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    layer.use_packed(layer.onednn_pack(batch_hint=1))
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, SPLIT_GEMV_ROWS])
@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_split_gemv_is_f_linear(parts: int, rows: int) -> None:
    torch.manual_seed(2)
    x, w, b = torch.randn(rows, 40), torch.randn(24, 40), torch.randn(24)
    torch.testing.assert_close(split_gemv(x, w, b, parts), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_gemv(x, w, None, parts), F.linear(x, w), rtol=1e-5, atol=1e-5)


ONEDNN_INT8 = pytest.mark.skipif(not onednn_int8_available(), reason="no exact oneDNN int8 linear on this CPU")


def int8_linear(in_features: int, out_features: int, bias: bool) -> QuantizedLinear:
    layer = make_linear(in_features, out_features, bias, "int8")
    layer.set_weight(*quantize_weight(torch.randn(out_features, in_features)))
    if bias:
        layer.bias.data.normal_()
    return layer


class TinyInt8(nn.Module):
    """Two int8 linears of one shape, one of another, and a float one beside them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.up = nn.ModuleList(int8_linear(32, 80, False) for _ in range(2))
        self.down = int8_linear(80, 32, True)
        self.head = make_linear(32, 50, False, None)


@ONEDNN_INT8
def test_onednn_int8_unusable_where_its_op_refuses_int8_or_is_inexact(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """torch 2.6's oneDNN int8 linear refuses signed activations (it wants uint8): the probe must say no, and
    so it must where the sums are not exact, rather than let int8 weights be packed for it."""
    exact = cpu_layout.onednn_int8_sums

    def refuses(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("qlinear with mkldnn tensor: data type of input should be uint8 (unsigned char).")

    try:
        for sums, logged in ((refuses, True), (lambda xq, packed: exact(xq, packed) + 1, False)):
            cpu_layout.onednn_int8_available.cache_clear()
            monkeypatch.setattr(cpu_layout, "onednn_int8_sums", sums)
            with caplog.at_level(logging.INFO, logger="vramlite.engine.layers.cpu_layout"):
                assert not cpu_layout.onednn_int8_available()
            assert ("int8 weights stay dense" in caplog.text) is logged
            caplog.clear()
    finally:
        cpu_layout.onednn_int8_available.cache_clear()


@pytest.mark.skipif(not (onednn_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
                         and torch.cpu._is_vnni_supported()), reason="no oneDNN int8 linear on this CPU")
def test_onednn_int8_unusable_where_it_runs_its_reference_code(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Exact but far slower than fp32 (oneDNN's reference code, as on 2 AMD EPYC cores): int8 stays dense."""
    exact = cpu_layout.onednn_int8_sums

    def slow(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        time.sleep(0.05)
        return exact(xq, packed)

    try:
        cpu_layout.onednn_int8_available.cache_clear()
        monkeypatch.setattr(cpu_layout, "onednn_int8_sums", slow)
        with caplog.at_level(logging.INFO, logger="vramlite.engine.layers.cpu_layout"):
            assert not cpu_layout.onednn_int8_available()
        assert "runs its reference code on this CPU" in caplog.text
    finally:
        cpu_layout.onednn_int8_available.cache_clear()


@pytest.mark.parametrize("available", [True, False])
def test_int8_linears_group_apart_from_float_ones(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(cpu_layout, "onednn_int8_available", lambda: available)
    groups = {(g.shape, g.dtype, g.x_dtype, g.layouts): len(g.members)
              for g in candidate_groups(TinyInt8(), torch.bfloat16)}
    packed = ("packed",) if available else ()
    assert {k: n for k, n in groups.items() if k[1] == torch.int8} == {
        ((80, 32), torch.int8, torch.bfloat16, ("dense", *packed)): 2,
        ((32, 80), torch.int8, torch.bfloat16, ("dense", *packed)): 1}


@ONEDNN_INT8
def test_int8_packed_fastest_moves_the_int8_weights() -> None:
    model = TinyInt8()
    chosen = prefer_cpu_layout(model, batch_hint=4, timer=ranked("packed", "rows", "dense"))
    assert chosen.get("packed", 0) >= 3
    for layer in (*model.up, model.down):
        assert layer.qweight is None and layer.packed is not None


@ONEDNN_INT8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_packed_is_the_w8a8_reference_exactly(dtype: torch.dtype) -> None:
    """Any leading dims, with a bias; each row's result is what it is alone (integer sums: batch-invariant)."""
    layer = int8_linear(80, 32, True)
    qweight, scale, bias = layer.qweight, layer.scale, layer.bias.data
    layer.use_packed(layer.onednn_pack(batch_hint=8))
    x = torch.randn(2, 9, 80, dtype=dtype)
    with torch.inference_mode():
        y = layer(x)
        torch.testing.assert_close(y, w8a8_linear_ref(x, qweight, scale, bias), rtol=0, atol=0)
        torch.testing.assert_close(layer(x[1, 4:5]), y[1, 4:5], rtol=0, atol=0)
        # W8A8 is the W8A16 product with the activations rounded to int8 codes: |x - x̂| <= x_scale/2 each, so
        # they differ by at most x_scale/2 · Σ|ŵ| per output, and by the rounding of each to dtype
        _, x_scale = quantize_activation_per_token_ref(x.float())
        w_hat = qweight.double() * scale.double()[:, None]
        near = w8a16_linear_ref(x.double(), qweight, scale.double(), bias.double())
        bound = x_scale.double()[..., None] / 2 * w_hat.abs().sum(1) + near.abs() * torch.finfo(dtype).eps
        assert ((y.double() - near).abs() <= bound * (1 + 1e-4) + 1e-5).all()


@ONEDNN_INT8
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch_compiles_decode(), reason=f"torch {torch.__version__} decodes eagerly"))])
def test_timed_int8_layouts_compute_what_they_did(compiled: bool) -> None:
    """The real timing, eager and as for a compiled engine (without the activations' quantization): whichever
    layout wins, dense is kernels' W8A16 and packed the W8A8 reference."""
    model = TinyInt8()
    x = torch.randn(3, 32)
    with torch.inference_mode():
        dense = [model.up[0](x), model.up[1](x)]
        refs = [w8a8_linear_ref(x, m.qweight, m.scale) for m in model.up]
        chosen = prefer_cpu_layout(model, batch_hint=4, compiled=compiled)
        for layer, want, ref in zip(model.up, dense, refs, strict=True):
            torch.testing.assert_close(layer(x), ref if layer.packed is not None else want, rtol=0, atol=0)
    assert sum(chosen.values()) == 4


def test_a_near_tie_keeps_the_dense_weight() -> None:
    """Within MARGIN of dense, packed is not taken: loads agree rather than flip with the timing noise."""
    near = 1 / (1 + cpu_layout.MARGIN / 2)
    layer = make_linear(24, 72, False, None)

    def timer(group: Group, layout: str, rows: int) -> float:
        return {"dense": 1.0, "rows": 1.0, "packed": near}[layout]

    assert prefer_cpu_layout(layer, batch_hint=1, timer=timer) == {"dense": 1}
    assert layer.packed is None and layer.gemv_parts == 1
