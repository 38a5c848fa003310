"""Lazy access to the tensors of an HF-format checkpoint (single or sharded safetensors).

Files are read with safetensors' mmap reader; a tensor is read from disk only
when asked for, so loading a model never holds a second copy of it in memory.
Each read maps the file anew and unmaps it after: pages of a kept mapping would
stay in the process's resident set, adding the checkpoint's whole size to the
peak RSS of a load that quantizes (measured in benchmarks/load_memory.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vramlite.engine.config import read_json
from vramlite.engine.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"


class CheckpointReader:
    """Maps tensor names to the safetensors file holding them; reads on demand."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._files = self._find_files(model_dir)
        self._where: dict[str, Path] = {}
        for path in sorted(set(self._files.values()) if self._files else self._single(model_dir)):
            with self._open(path) as handle:
                for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    self._where[name] = path

    @staticmethod
    def _find_files(model_dir: Path) -> dict[str, Path]:
        index = model_dir / INDEX_FILE
        if not index.exists():
            return {}
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index}: expected a non-empty \"weight_map\" object")
        files = {name: model_dir / fname for name, fname in weight_map.items()}
        for path in set(files.values()):
            if not path.exists():
                raise ModelLoadError(f"{index} names shard {path.name}, which is missing from {model_dir}")
        return files

    @staticmethod
    def _single(model_dir: Path) -> list[Path]:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"no *.safetensors weights in {model_dir} (expected model.safetensors "
                                 f"or shards listed in {INDEX_FILE})")
        return files

    @staticmethod
    def _open(path: Path) -> Any:
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{path} is not a readable safetensors file: {e}{_cut_off(path)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name`, checked against `shape` when given."""
        path = self._where.get(name)
        if path is None:
            raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        try:
            with self._open(path) as handle:
                tensor = handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"tensor {name!r} in {path} cannot be read: {e}") from None
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ModelLoadError(
                f"tensor {name!r} in {path.name} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                f"from config.json"
            )
        return tensor


def _cut_off(path: Path) -> str:
    """For a truncated file whose header still reads: which tensors lie past its end ('' if none or unreadable)."""
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        size = path.stat().st_size - 8 - length
        lost = sorted((entry["data_offsets"][0], name) for name, entry in header.items()
                      if name != "__metadata__" and entry["data_offsets"][1] > size)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return ""
    if not lost:
        return ""
    return (f" (the file is truncated to {path.stat().st_size} bytes: {len(lost)} tensors end past it, "
            f"the first {lost[0][1]!r})")
