"""Linear layers: plain (float weights) or int8 (per-output-channel scales, multiplied by our kernels)."""

from __future__ import annotations

import torch
from torch import nn

from vramlite.kernels import int8_linear, w8a8_linear_with

QUANTIZATIONS = ("int8",)


class QuantizedLinear(nn.Module):
    """y = x · (qweight ∘ scale)ᵀ + bias, with qweight int8 [out, in] and one fp32 scale per output row.

    On the CPU the weight may be handed to oneDNN instead (`use_packed`): x is then quantized per token and
    multiplied in int8 (W8A8, `vramlite.kernels.w8a8_linear_with`), where torch's int8-weight kernel (W8A16) reads the
    weight at a fraction of the memory's speed. `vramlite.engine.layers.cpu_layout` chooses, by timing."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.packed: torch.Tensor | None
        self.register_buffer("packed", None, persistent=False)

    def set_weight(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        self.qweight = qweight.contiguous()
        self.scale = scale.float().contiguous()

    @property
    def dense_weight(self) -> torch.Tensor | None:
        """The row-major int8 weight; None once packed."""
        return self.qweight

    def onednn_pack(self, batch_hint: int) -> torch.Tensor:
        """oneDNN's packed copy of qweight (same size), blocked for `batch_hint` rows."""
        return torch.ops.onednn.qlinear_prepack(self.qweight, [batch_hint, self.in_features])

    def use_packed(self, packed: torch.Tensor) -> None:
        """Multiply by `packed` (from `onednn_pack`) from now on, in place of qweight."""
        self.packed, self.qweight = packed, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if self.packed is not None:
            matmul = onednn_int8_matmul if compiling else onednn_int8_sums
            return w8a8_linear_with(lambda xq: matmul(xq, self.packed), x, self.scale, self.bias)
        if compiling:
            return int8_linear_op(x, self.qweight, self.scale, self.bias)
        return int8_linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Linear(nn.Linear):
    """nn.Linear whose CPU weight may be handed to oneDNN (`use_packed`), or multiplied one row at a time
    in row blocks (`gemv_parts`): `vramlite.engine.layers.cpu_layout` chooses, by timing."""

    gemv_parts = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.packed: torch.Tensor | None
        self.register_buffer("packed", None, persistent=False)  # a buffer, so memory accounting counts it

    @property
    def dense_weight(self) -> torch.Tensor | None:
        """The row-major weight; None once packed."""
        return None if self.weight is None else self.weight.data

    def onednn_pack(self, batch_hint: int) -> torch.Tensor:
        """oneDNN's packed copy of the weight (same size), blocked for `batch_hint` rows."""
        return torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)

    def use_packed(self, packed: torch.Tensor) -> None:
        """Multiply by `packed` (from `onednn_pack`) from now on, in place of the weight."""
        self.packed, self.weight = packed, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if torch.compiler.is_compiling():
                return onednn_linear(x.reshape(-1, self.in_features), self.packed, self.bias).view(
                    *x.shape[:-1], self.out_features)
            if x.dim() == 2:  # the engine's packed tokens: no reshape on the hot path
                return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed, self.bias,
                                                   "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
        if self.gemv_parts > 1 and x.dim() == 2 and x.shape[0] <= SPLIT_GEMV_ROWS:
            return split_gemv(x, self.weight, self.bias, self.gemv_parts)
        return super().forward(x)


@torch.library.custom_op("vramlite::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, in] times a weight packed by oneDNN (`Linear.onednn_pack`), as an op torch.compile calls
    as it is (Inductor lowers oneDNN's own op only for weights that are constants of a frozen graph)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0])


_ONE, _ZERO = torch.ones(1), torch.zeros(1, dtype=torch.long)


def onednn_int8_sums(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """xq [M, in] int8 times an int8 weight packed by oneDNN: the int32 sums as fp32 [M, out]."""
    # unit scales and zero points: oneDNN returns the int32 sums as fp32 (as kernels' reference does) and
    # the scales are applied by w8a8_linear_with, in the reference's order
    return torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, packed, _ONE, _ZERO, None, 1.0, 0, torch.float32,
                                              "none", [], "")


@torch.library.custom_op("vramlite::onednn_int8_matmul", mutates_args=())
def onednn_int8_matmul(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """xq [M, in] int8 times an int8 weight packed by oneDNN (`QuantizedLinear.onednn_pack`): the exact sums
    as fp32 [M, out], as an op torch.compile calls as it is."""
    return onednn_int8_sums(xq, packed)


@onednn_int8_matmul.register_fake
def _(xq: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return xq.new_empty(xq.shape[0], packed.shape[1], dtype=torch.float32)


@torch.library.custom_op("vramlite::int8_linear", mutates_args=())
def int8_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor:
    """`vramlite.kernels.int8_linear` as an op torch.compile calls as it is (Inductor cannot lower torch's int8 CPU
    matmul)."""
    return int8_linear(x, qweight, scale, bias)


@int8_linear_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


SPLIT_GEMV_ROWS = 5
"""The most rows `split_gemv` multiplies (a decode step of a few sequences; a sequence checking 4 drafted tokens).
On 2 Intel Xeon cores (Sapphire Rapids), fp32 LLaMA-130M weights from DRAM: 1.3-7x faster than `F.linear` at
2 to 4 rows (whose MKL path is slowest there, slower than at 8 rows), as fast at 5, slower from 6 on; on 2 AMD
EPYC cores, 1.3-3.4x faster at 2 to 5 rows, 1.4x slower at 8."""


def split_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int) -> torch.Tensor:
    """x [M, in] · weightᵀ for a few rows M and a contiguous weight [out, in], as `parts` row blocks of the weight
    in one bmm.

    Where a CPU matrix-vector product runs on one thread, a bmm still runs its batch in parallel, so the
    blocks stream on all threads: 2-3x faster than `F.linear` at M = 1 with 2 threads on a 2-core AMD EPYC
    (256x256 to 32000x768); on a 2-core Intel Xeon, 2-3x slower on one machine and 2-3x faster on another
    (see SPLIT_GEMV_ROWS), whence the timing at load.
    """
    rows = x.shape[0]
    y = torch.bmm(weight.view(parts, -1, weight.shape[1]), x.t().expand(parts, -1, -1)).view(-1, rows).t()
    y = y if rows == 1 else y.contiguous()
    return y if bias is None else y.add_(bias)


def make_linear(in_features: int, out_features: int, bias: bool, quantization: str | None) -> nn.Module:
    """The linear layer a model family should build for its decoder blocks."""
    if quantization is None:
        return Linear(in_features, out_features, bias=bias)
    if quantization == "int8":
        return QuantizedLinear(in_features, out_features, bias)
    raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
