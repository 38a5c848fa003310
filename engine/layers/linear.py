"""Linear layers: plain (float weights) or int8 (per-output-channel scales, multiplied by our kernels)."""

from __future__ import annotations

import platform
from collections import Counter

import torch
from torch import nn

from kernels import int8_linear

QUANTIZATIONS = ("int8",)
ONEDNN_FP32_MIN_WEIGHTS = 1 << 20  # fp32 weights this large or larger go to oneDNN (see prefer_cpu_layout)


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


class Linear(nn.Linear):
    """nn.Linear whose CPU weight `prefer_cpu_layout` may hand to oneDNN in its own blocked layout."""

    packed: torch.Tensor | None = None

    def pack_for_onednn(self, batch_hint: int) -> None:
        """Replace the weight by oneDNN's packed copy of it (same size, blocked for `batch_hint` rows)."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return super().forward(x)
        if x.dim() == 2:  # the engine's packed tokens: no reshape on the hot path
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias, "none",
                                               [], "")
        return y.view(*x.shape[:-1], self.out_features)


def make_linear(in_features: int, out_features: int, bias: bool, quantization: str | None) -> nn.Module:
    """The linear layer a model family should build for its decoder blocks."""
    if quantization is None:
        return Linear(in_features, out_features, bias=bias)
    if quantization == "int8":
        return QuantizedLinear(in_features, out_features, bias)
    raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")


def onednn_available() -> bool:
    """Whether this torch build has oneDNN's packed linear on x86 (what torch.compile uses on the CPU)."""
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def prefer_cpu_layout(model: nn.Module, batch_hint: int) -> int:
    """Lay CPU linear weights out for decode speed; returns how many changed.

    With oneDNN (x86), a `Linear` that owns its weight gets oneDNN's packed copy instead when the weight is
    bf16 (where the CPU has bf16 instructions; 1.3-3.3x faster than `F.linear` at M = 1..8) or an fp32 one
    of at least ONEDNN_FP32_MIN_WEIGHTS elements (as fast as the best dense layout at M = 1, 1.4-3.3x faster
    at M = 8). A call costs oneDNN about 10 us more, so smaller fp32 layers stay dense: 256x256 at M = 1 takes
    5 us dense, 14 packed (measured on the 2-core AVX-512 CI machine, 1 thread).

    Dense fp32 wide layers (out > in; also an LM head tied to the embedding, and every layer without oneDNN)
    are stored column-major: `F.linear(x, w)` multiplies by wᵀ, and with w column-major wᵀ is a plain
    row-major [in, out] matrix, which MKL streams 1.3-2.9x faster at M = 1. The parameter keeps its
    [out, in] shape, and a tied embedding its row lookups.

    Weights that are views into a larger buffer (an offload slot) keep their place.
    """
    shared = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    onednn = onednn_available()
    onednn_bf16 = onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight is None:
            continue
        w = module.weight.data
        if w.device.type != "cpu" or not w.is_contiguous() or w.untyped_storage().nbytes() != w.nbytes:
            continue
        fp32 = w.dtype == torch.float32
        worth_packing = (fp32 and onednn and w.numel() >= ONEDNN_FP32_MIN_WEIGHTS) \
            or (w.dtype == torch.bfloat16 and onednn_bf16)
        if worth_packing and isinstance(module, Linear) and shared[id(module.weight)] == 1:
            module.pack_for_onednn(batch_hint)
        elif fp32 and module.out_features > module.in_features:
            module.weight.data = w.t().contiguous().t()
        else:
            continue
        changed += 1
    return changed
