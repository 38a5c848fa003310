"""LoRA adapters in PEFT's format, merged into the base checkpoint's weights as they are read.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`
(what PEFT's `save_pretrained` writes). Merging adds scale · (alpha / r) · B·A
(alpha / √r under rsLoRA) to each targeted weight in fp32, before any int8
quantization, so an adapted model runs exactly as fast as the base one. Tensors
the adapter saves whole (`modules_to_save`, an adapted embedding's base) replace
the checkpoint's. Several adapters add up, each with its own scale.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from vramlite.engine.errors import ModelLoadError
from vramlite.engine.weights import CheckpointReader

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
# key suffix → (which factor, whether the product B·A is the transpose of the weight's layout)
FACTORS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
           ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}


@dataclass
class LowRank:
    """One weight's update, `scaling` · B·A; `transposed`: the weight is stored as B·A's transpose (an
    embedding, or a Conv1D weight [in, out]: PEFT's fan_in_fan_out)."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    transposed: bool = False
    scaling: float = 1.0

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The update in the layout of a weight of `shape`: as `transposed` says for a square one, else
        transposed where only the transpose has that shape (PEFT may have set fan_in_fan_out per module)."""
        assert self.a is not None and self.b is not None
        product = self.b.float() @ self.a.float() * self.scaling
        flip = self.transposed if product.shape[0] == product.shape[1] else product.t().shape == shape
        return product.t() if flip else product


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter read from `path`: its low-rank updates and whole tensors, by base tensor name."""

    path: Path
    scale: float = 1.0
    updates: dict[str, LowRank] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, scale: float = 1.0) -> LoraAdapter:
        """Read and check an adapter directory; ModelLoadError names what is missing or unsupported."""
        path = Path(path)
        config = _read_config(path)
        try:
            tensors = load_file(path / ADAPTER_WEIGHTS)
        except FileNotFoundError:
            raise ModelLoadError(f"LoRA adapter {path}: no {ADAPTER_WEIGHTS} (an adapter saved as .bin "
                                 "must be saved again with safetensors)") from None
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"LoRA adapter {path}: {ADAPTER_WEIGHTS} is not readable: {e}") from None
        adapter = cls(path, scale)
        for key, tensor in tensors.items():
            adapter._add(key, tensor)
        for name, update in adapter.updates.items():
            if update.a is None or update.b is None:
                raise ModelLoadError(f"LoRA adapter {path}: {name} has only one of its two factors")
            update.scaling = scale * _scaling(config, name.removesuffix(".weight"), update.a.shape[0])
            update.transposed = update.transposed or bool(config.get("fan_in_fan_out"))
        return adapter

    def _add(self, key: str, tensor: torch.Tensor) -> None:
        if not key.startswith(KEY_PREFIX):
            raise ModelLoadError(f"LoRA adapter {self.path}: tensor {key!r} does not start with {KEY_PREFIX!r} "
                                 "(not a PEFT adapter of a causal LM)")
        name = key.removeprefix(KEY_PREFIX)
        for suffix, (factor, transposed) in FACTORS.items():
            if name.endswith(suffix):
                update = self.updates.setdefault(name.removesuffix(suffix) + ".weight", LowRank(transposed=transposed))
                setattr(update, factor.lower(), tensor)
                return
        if "lora_" in name:
            raise ModelLoadError(f"LoRA adapter {self.path}: tensor {key!r} is of a LoRA variant that cannot be "
                                 "merged here (plain LoRA and rsLoRA can)")
        self.replacements[name.replace(".base_layer.", ".")] = tensor


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ModelLoadError(f"LoRA adapter directory {path} does not exist")
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"LoRA adapter {path}: no {ADAPTER_CONFIG}") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"LoRA adapter {path}: {ADAPTER_CONFIG} is not readable JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ModelLoadError(f"LoRA adapter {path}: peft_type is {config.get('peft_type')!r}, not 'LORA'")
    for option in ("use_dora", "lora_bias", "use_qalora"):
        if config.get(option):
            raise ModelLoadError(f"LoRA adapter {path}: {option} is not supported (plain LoRA and rsLoRA are)")
    if not isinstance(config.get("lora_alpha"), int | float) or not isinstance(config.get("r"), int):
        raise ModelLoadError(f"LoRA adapter {path}: {ADAPTER_CONFIG} lacks a numeric \"r\" and \"lora_alpha\"")
    return config


def _scaling(config: dict[str, Any], module: str, rank: int) -> float:
    """PEFT's alpha / r (alpha / √r with rsLoRA), alpha from `alpha_pattern` where a key matches the module's
    name as PEFT matches it; r is the rank the factors have."""
    alpha = config["lora_alpha"]
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / (rank ** 0.5 if config.get("use_rslora") else rank)


class AdaptedReader(CheckpointReader):
    """A `CheckpointReader` whose tensors come out with the adapters merged in, in their order. ModelLoadError
    at construction if an adapter changes a tensor the checkpoint lacks (an adapter for another model)."""

    def __init__(self, model_dir: Path, adapters: list[LoraAdapter]) -> None:
        super().__init__(model_dir)
        self.adapters = adapters
        for adapter in adapters:
            absent = [name for name in (*adapter.updates, *adapter.replacements) if name not in self]
            if absent:
                raise ModelLoadError(f"LoRA adapter {adapter.path} changes {len(absent)} tensors that {model_dir} "
                                     f"does not have (an adapter for another model?): {', '.join(absent[:3])}"
                                     f"{' ...' if len(absent) > 3 else ''}")

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        tensor = super().get(name, shape)
        merged: torch.Tensor | None = None
        for adapter in self.adapters:
            replacement, update = adapter.replacements.get(name), adapter.updates.get(name)
            if replacement is None and update is None:
                continue
            if tensor.dtype == torch.int8:
                raise ModelLoadError(f"LoRA adapter {adapter.path} changes {name}, which {self.model_dir} stores "
                                     "in int8: apply the adapter to the float checkpoint (vramlite quantize "
                                     "--lora writes an int8 copy with it merged)")
            merged = tensor.float() if merged is None else merged
            if replacement is not None:
                merged = _checked(adapter, name, replacement.float(), merged)
            if update is not None:
                merged = merged + _checked(adapter, name, update.delta(merged.shape), merged)
        return tensor if merged is None else merged.to(tensor.dtype)


def _checked(adapter: LoraAdapter, name: str, change: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if change.shape != weight.shape:
        raise ModelLoadError(f"LoRA adapter {adapter.path} has {name} of shape {tuple(change.shape)}, the model "
                             f"{tuple(weight.shape)}: an adapter for another model")
    return change


def parse_adapter(spec: str) -> tuple[str, float]:
    """'DIR' or 'DIR:SCALE' (the suffix counts as a scale only where it reads as a number) → (DIR, scale)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0
