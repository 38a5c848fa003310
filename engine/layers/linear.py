"""Linear layers: plain (float weights) or int8 (per-output-channel scales, multiplied by our kernels)."""

from __future__ import annotations

import torch
from torch import nn

from kernels import int8_linear

QUANTIZATIONS = ("int8",)


class QuantizedLinear(nn.Module):
    """y = x · (qweight ∘ scale)ᵀ + bias, with qweight int8 [out, in] and one fp32 scale per output row."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def set_weight(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        self.qweight = qweight.contiguous()
        self.scale = scale.float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def make_linear(in_features: int, out_features: int, bias: bool, quantization: str | None) -> nn.Module:
    """The linear layer a model family should build for its decoder blocks."""
    if quantization is None:
        return nn.Linear(in_features, out_features, bias=bias)
    if quantization == "int8":
        return QuantizedLinear(in_features, out_features, bias)
    raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")


def prefer_cpu_layout(model: nn.Module) -> int:
    """Store fp32 CPU weights of wide linear layers (out > in) column-major; returns how many changed.

    `F.linear(x, w)` multiplies by wᵀ; with w column-major, wᵀ is a plain
    row-major [in, out] matrix, which MKL's fp32 GEMM streams 1.3-2.9x faster
    at M = 1 than the transposed case when the weights come from DRAM
    (measured on the 2-core AVX-512 CI machine: qkv, gate/up and LM-head
    shapes; tall layers such as down_proj are slower that way and stay as
    they are). The parameter keeps its [out, in] shape, so nothing else changes;
    a tied embedding reads the same storage, which row lookups do not mind.
    Weights that are views into a larger buffer (an offload slot) keep their place.
    """
    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.out_features <= module.in_features:
            continue
        w = module.weight.data
        if w.device.type == "cpu" and w.dtype == torch.float32 and w.is_contiguous() \
                and w.untyped_storage().nbytes() == w.nbytes:
            module.weight.data = w.t().contiguous().t()
            changed += 1
    return changed
