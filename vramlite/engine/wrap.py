"""`wrap`: int8 weights and layer offload for any torch model whose blocks sit in an `nn.ModuleList`.

BMInf's `wrapper` for models vramlite has no family for: the largest
`nn.ModuleList` is taken as the stack of blocks; its linear layers can be
quantized to int8, and with a `memory_limit` the blocks that do not fit are
kept in the host arena and streamed into device slots around each block's
forward (forward hooks), exactly as for the built-in families.
"""

from __future__ import annotations

import torch
from torch import nn

from vramlite.engine.config import parse_size
from vramlite.engine.device import pick_device
from vramlite.engine.layers.linear import QUANTIZATIONS, QuantizedLinear
from vramlite.engine.offload import WeightStore, layer_sizes, plan_offload, tensor_bytes
from vramlite.kernels import quantize_weight


def wrap(model: nn.Module, quantize: str | None = None, memory_limit: int | str | None = None,
         device: str | torch.device | None = None, prefetch_depth: int = 1,
         workspace: int | str = "512MiB") -> nn.Module:
    """Move `model` to `device` (default: a GPU if present), in place, and return it.

    quantize="int8" replaces every `nn.Linear` inside the blocks by an int8
    `QuantizedLinear`. memory_limit (bytes or "5GiB") caps the device memory
    of the weights plus `workspace` (the model's own activations and cache,
    which vramlite cannot see); blocks that do not fit are streamed. The plan
    and transfer accounting are at `model.vramlite_offload` (None without a limit).
    """
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize {quantize!r} is not one of {', '.join(QUANTIZATIONS)} or None")
    dev = pick_device(device)
    blocks = find_blocks(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if quantize == "int8":
        for block in blocks:
            quantize_linears(block)
    model.vramlite_offload = None
    if memory_limit is None:
        return model.to(dev)
    sizes = layer_sizes(blocks, dtype)
    plan = plan_offload(sizes, tensor_bytes(model, dtype, list(blocks)), 0, parse_size(workspace),
                        parse_size(memory_limit), prefetch_depth)
    store = WeightStore(blocks, plan, dtype, dev)
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    for module in model.modules():
        for name, tensor in own_tensors(module) if id(module) not in in_blocks else ():
            replace(module, name, tensor, tensor.data.to(dev))
    for i, block in enumerate(blocks):
        for module in block.modules():
            for name, tensor in own_tensors(module):
                # As LayerLayout plans it: float parameters in the compute dtype, buffers as they are.
                data = tensor.data.to(dtype) if isinstance(tensor, nn.Parameter) and tensor.is_floating_point() \
                    else tensor.data
                placed = store.place(module, name, data)
                replace(module, name, tensor, placed.to(dev) if i in plan.resident else placed)
    store.start()
    if store.streamer is not None:
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(lambda _m, _a, i=i: store.streamer.before(i))
            block.register_forward_hook(lambda _m, _a, _o, i=i: store.streamer.after(i))
    model.vramlite_offload = store
    return model


def own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]


def replace(module: nn.Module, name: str, old: torch.Tensor, data: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(data, requires_grad=False) if isinstance(old, nn.Parameter) else data)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The `nn.ModuleList` holding most of the model's parameters: its stack of blocks."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no nn.ModuleList of blocks to quantize or offload")
    return max(lists, key=lambda ml: sum(p.numel() for p in ml.parameters()))


def quantize_linears(module: nn.Module) -> None:
    """Replace each `nn.Linear` below `module` by an int8 `QuantizedLinear`, in place."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            q = QuantizedLinear(child.in_features, child.out_features, child.bias is not None)
            q.set_weight(*quantize_weight(child.weight.data))
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, name, q)
        else:
            quantize_linears(child)
