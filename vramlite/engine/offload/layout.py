"""Flat layouts of a layer's tensors: one byte buffer per layer, so a streamed layer moves in a single copy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256  # bytes; what cudaMalloc guarantees, more than any kernel's vector loads need


def align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Entry:
    """One tensor of a layer: `module` (dotted path inside the layer) `.name`, at `offset` of the layer's buffer."""

    module: str
    name: str
    is_param: bool
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


@dataclass(frozen=True)
class LayerLayout:
    """Where each tensor of one layer lives in a flat byte buffer; `nbytes` is the aligned total."""

    entries: tuple[Entry, ...]
    nbytes: int

    @classmethod
    def of(cls, layer: nn.Module, dtype: torch.dtype) -> LayerLayout:
        """The layout of `layer` once loaded (it may still be on `meta`).

        As `CausalLM.load_weights` leaves them: float parameters in the compute
        `dtype`, buffers (an int8 linear's qweight and fp32 scale) in their own.
        """
        entries, offset = [], 0
        tensors = [(n, t, True) for n, t in layer.named_parameters()] + \
                  [(n, t, False) for n, t in layer.named_buffers()]
        for qualified, tensor, is_param in tensors:
            module, _, name = qualified.rpartition(".")
            kind = dtype if is_param and tensor.is_floating_point() else tensor.dtype
            entry = Entry(module, name, is_param, tuple(tensor.shape), kind, offset)
            entries.append(entry)
            offset = align(offset + entry.nbytes)
        return cls(tuple(entries), offset)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of the tensors themselves, padding excluded."""
        return sum(e.nbytes for e in self.entries)

    def find(self, module: str, name: str) -> Entry:
        for entry in self.entries:
            if entry.module == module and entry.name == name:
                return entry
        raise KeyError(f"{module}.{name} is not a tensor of this layer")

    def view(self, buffer: torch.Tensor, entry: Entry) -> torch.Tensor:
        """`entry`'s tensor inside a uint8 `buffer` laid out by this layout."""
        return buffer[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)

    def bind(self, layer: nn.Module, buffer: torch.Tensor) -> None:
        """Point every tensor of `layer` at its place in `buffer` (no copy)."""
        for entry in self.entries:
            module = layer.get_submodule(entry.module)
            view = self.view(buffer, entry)
            setattr(module, entry.name, nn.Parameter(view, requires_grad=False) if entry.is_param else view)

