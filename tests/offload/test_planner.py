"""The offload planner on many (model size, budget, batch, context) cases, impossible ones included."""

from __future__ import annotations

import itertools
import re

import pytest

from vramlite.engine.config import parse_size
from vramlite.engine.offload.planner import OffloadPlan, min_budget, plan_offload, spread

MiB, GiB = 2**20, 2**30
LLAMA_7B_INT8_LAYER = 202 * MiB  # 4·4096² + 3·4096·11008 int8 weights + fp32 scales + norms
# (layers, layer bytes, fixed bytes, KV bytes per sequence-context unit) of a few model shapes
MODELS = {
    "7b-int8": (32, LLAMA_7B_INT8_LAYER, 2 * 32000 * 4096 * 2, 32 * 2 * 4096 * 2),
    "1b-fp16": (22, 88 * MiB, 2 * 32000 * 2048 * 2, 22 * 2 * 256 * 2),
    "tiny": (6, 120 * 1024, 256 * 1024, 6 * 2 * 64 * 4),
}
CASES = [(m, b, c, limit) for m in MODELS for b in (1, 8, 32) for c in (256, 2048)
         for limit in (256 * MiB, 1 * GiB, 4 * GiB, 5 * GiB, 8 * GiB, 24 * GiB)]
WORKSPACE = 64 * MiB


def inputs(model: str, batch: int, context: int) -> tuple[list[int], int, int, int]:
    layers, layer, fixed, kv_unit = MODELS[model]
    return [layer] * layers, fixed, kv_unit * batch * context, WORKSPACE


@pytest.mark.parametrize(("model", "batch", "context", "limit"), CASES)
def test_plan_fits_or_names_the_smallest_budget(model, batch, context, limit):
    sizes, fixed, kv, ws = inputs(model, batch, context)
    smallest = min_budget(sizes, fixed, kv, ws)
    if limit < smallest:
        with pytest.raises(ValueError, match="too small") as err:
            plan_offload(sizes, fixed, kv, ws, limit)
        assert f"= {smallest} bytes" in str(err.value)
        plan_offload(sizes, fixed, kv, ws, smallest)  # the budget named works
        return
    plan = plan_offload(sizes, fixed, kv, ws, limit)
    assert plan.device_bytes <= limit
    assert sorted(plan.resident + plan.streamed) == list(range(len(sizes)))
    if plan.streamed:
        assert plan.num_slots == min(2, len(plan.streamed)) and plan.slot_bytes == sizes[0]
        # one more resident layer would not fit
        assert plan.device_bytes + sizes[0] > limit or len(plan.streamed) <= plan.num_slots
    else:
        assert plan.num_slots == 0 and plan.device_bytes == fixed + kv + ws + sum(sizes)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_more_budget_never_fewer_resident_layers(model, depth):
    sizes, fixed, kv, ws = inputs(model, 4, 512)
    low = min_budget(sizes, fixed, kv, ws, depth)
    high = fixed + kv + ws + sum(sizes)
    previous = -1
    for k in range(200):
        limit = low + (high - low) * k // 199
        plan = plan_offload(sizes, fixed, kv, ws, limit, depth)
        assert len(plan.resident) >= previous
        assert plan.device_bytes <= limit
        previous = len(plan.resident)
    assert previous == len(sizes)


def test_smallest_budget_is_two_slots_and_the_rest():
    sizes, fixed, kv, ws = [100] * 8, 1000, 500, 50
    assert min_budget(sizes, fixed, kv, ws) == fixed + kv + ws + 2 * 100
    assert min_budget(sizes, fixed, kv, ws, prefetch_depth=3) == fixed + kv + ws + 4 * 100
    plan = plan_offload(sizes, fixed, kv, ws, fixed + kv + ws + 200)
    assert plan.streamed == tuple(range(8)) and plan.num_slots == 2
    with pytest.raises(ValueError, match=re.escape("= 1750 bytes")):
        plan_offload(sizes, fixed, kv, ws, 1749)


def test_streaming_pays_only_past_the_slots():
    # Streaming 1 or 2 uniform layers takes as much VRAM as keeping them (2 slots): all or ≥ 3 streamed.
    sizes = [100] * 6
    assert plan_offload(sizes, 0, 0, 0, 600).streamed == ()
    assert len(plan_offload(sizes, 0, 0, 0, 599).streamed) == 3
    assert len(plan_offload(sizes, 0, 0, 0, 500).streamed) == 3
    assert len(plan_offload(sizes, 0, 0, 0, 499).streamed) == 4


def test_uneven_layers_size_the_slots_by_the_largest_streamed():
    sizes = [100, 100, 400, 100, 100, 100]
    plan = plan_offload(sizes, 0, 0, 0, 800)
    assert plan.device_bytes <= 800
    assert plan.slot_bytes == max(sizes[i] for i in plan.streamed)


@pytest.mark.parametrize(("layers", "streamed"), [(32, 16), (32, 20), (32, 1), (32, 31), (6, 3), (7, 7), (5, 0)])
def test_spread_is_even_and_centred(layers, streamed):
    idx = spread(layers, streamed)
    assert len(idx) == len(set(idx)) == streamed
    assert all(0 <= i < layers for i in idx)
    if streamed > 1:
        gaps = [b - a for a, b in itertools.pairwise(idx)]
        assert max(gaps) - min(gaps) <= 1
    if streamed:  # no run of resident layers (cyclic: the next step follows) is longer than needed
        runs = [(b - a - 1) % layers for a, b in zip(idx, (*idx[1:], idx[0] + layers), strict=True)]
        assert max(runs) <= -(-(layers - streamed) // streamed)


def test_half_streamed_alternates_so_each_copy_overlaps_a_resident_layer():
    plan = plan_offload([10] * 8, 0, 0, 0, 60)
    assert plan.streamed == (1, 3, 5, 7) and plan.resident == (0, 2, 4, 6)


def test_describe_and_as_dict():
    plan = plan_offload([10 * MiB] * 8, 100 * MiB, 50 * MiB, 10 * MiB, 230 * MiB)
    text = "\n".join(plan.describe())
    assert "memory limit 230.00 MiB" in text and "swap slots" in text and "resident" in text
    info = plan.as_dict()
    assert info["resident_layers"] == list(plan.resident) and info["streamed_layers"] == list(plan.streamed)
    assert info["planned_bytes"] == plan.device_bytes <= 230 * MiB
    assert isinstance(plan, OffloadPlan)


@pytest.mark.parametrize(("args", "message"), [
    (([], 0, 0, 0, 100), "at least one layer"),
    (([10], 0, 0, 0, 100, 0), "prefetch_depth"),
    (([10], -1, 0, 0, 100), "≥ 0"),
])
def test_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        plan_offload(*args)


@pytest.mark.parametrize(("text", "expected"), [("5GiB", 5 * GiB), ("512MiB", 512 * MiB), ("6GB", 6 * 10**9),
                                                ("1024", 1024), (" 1.5 gib ", int(1.5 * GiB)), (4096, 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["five", "5 GiBs", "", "0", -3, True])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)
