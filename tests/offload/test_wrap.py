"""`wrap` on a model vramlite has no family for: int8 linears and streamed blocks give the same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vramlite.engine.layers.linear import QuantizedLinear
from vramlite.engine.wrap import find_blocks, wrap


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.norm(x))))


class TinyNet(nn.Module):
    def __init__(self, width: int = 32, depth: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.fixture
def net():
    torch.manual_seed(0)
    return TinyNet().eval()


IDS = torch.tensor([[1, 5, 9, 13, 2]])
BLOCK_BYTES = 4 * (32 * 128 + 128 + 128 * 32 + 32 + 2 * 32)


@torch.inference_mode()
def test_streaming_blocks_gives_identical_outputs(net):
    ref = net(IDS)
    wrapped = wrap(copy.deepcopy(net), memory_limit=3 * BLOCK_BYTES + 4 * 50 * 32 * 2 + 4096 + 1024,
                   device="cpu", workspace=4096)
    store = wrapped.vramlite_offload
    assert len(store.plan.streamed) >= 3, store.plan.describe()
    for _ in range(2):  # twice: the second pass runs on prefetched slots
        torch.testing.assert_close(wrapped(IDS), ref, atol=1e-5, rtol=0)
    assert store.stats.snapshot().h2d_bytes > 0


@torch.inference_mode()
def test_int8_wrap_is_close_and_quantizes_only_the_blocks(net):
    ref = net(IDS)
    wrapped = wrap(copy.deepcopy(net), quantize="int8", device="cpu")
    assert all(isinstance(b.up, QuantizedLinear) and isinstance(b.down, QuantizedLinear) for b in wrapped.blocks)
    assert isinstance(wrapped.head, nn.Linear)
    out = wrapped(IDS)
    assert ((out - ref).norm() / ref.norm()) < 0.02


@torch.inference_mode()
def test_int8_and_streaming_together_equal_int8_resident(net):
    resident = wrap(copy.deepcopy(net), quantize="int8", device="cpu")
    streamed = wrap(copy.deepcopy(net), quantize="int8", memory_limit=40_000, device="cpu", workspace=4096)
    assert streamed.vramlite_offload.plan.streamed
    torch.testing.assert_close(streamed(IDS), resident(IDS), atol=0, rtol=0)


def test_bad_input(net):
    with pytest.raises(ValueError, match=r"no nn\.ModuleList"):
        find_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="quantize 'int4'"):
        wrap(net, quantize="int4", device="cpu")
    with pytest.raises(ValueError, match=r"smallest budget that works"):
        wrap(net, memory_limit=1000, device="cpu")
