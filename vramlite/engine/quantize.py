"""Writing int8 checkpoints: `vramlite quantize IN_DIR OUT_DIR`.

The output is an HF-format directory whose decoder-block linear weights are
int8 (same names and layout as the input, e.g. `model.layers.0.mlp.up_proj.weight`)
each with a float32 per-output-channel scale `<name>_scale`; every other tensor
is copied unchanged, and config.json gains
`"quantization_config": {"quant_method": "vramlite-int8", "bits": 8}`.
It loads with no re-quantization, to exactly the weights `quantize="int8"` gives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from vramlite.engine.config import read_json
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.layers.linear import QuantizedLinear
from vramlite.engine.loader import INT8_METHOD, checkpoint_reader
from vramlite.engine.models import family
from vramlite.engine.models.base import SCALE_SUFFIX
from vramlite.engine.weights import INDEX_FILE
from vramlite.kernels import quantize_weight

log = logging.getLogger(__name__)

SHARD_BYTES = 2 * 2**30


def quantize_checkpoint(in_dir: str | Path, out_dir: str | Path, shard_bytes: int = SHARD_BYTES,
                        lora: Sequence[tuple[str | Path, float]] = ()) -> Path:
    """Write the int8 version of the checkpoint in `in_dir` to `out_dir`, tensor by tensor, with the `lora`
    adapters (directory, scale) merged in first."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.is_dir():
        raise ModelLoadError(f"model directory {in_dir} does not exist")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"output directory {out_dir} is not empty")
    raw = read_json(in_dir / "config.json")
    if raw.get("quantization_config"):
        raise ValueError(f"{in_dir} is already quantized ({raw['quantization_config']})")
    cls = family(raw.get("model_type"))
    cfg = dataclasses.replace(cls.parse_config(raw), quantization="int8")
    with torch.device("meta"):
        model = cls(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, shard_bytes)
    reader = checkpoint_reader(in_dir, lora)
    int8_sources: dict[str, bool] = {}  # checkpoint name → stored [in, out] (Conv1D)
    for spec in model.all_weight_specs(reader):
        if isinstance(spec.module, QuantizedLinear) and spec.param == "weight":
            int8_sources.update(dict.fromkeys(spec.sources, spec.transposed))
    for name in reader.names():
        tensor = reader.get(name)
        if name in int8_sources:
            transposed = int8_sources[name]
            q, scale = quantize_weight(tensor.t() if transposed else tensor)
            writer.add(name, q.t().contiguous() if transposed else q)
            writer.add(name + SCALE_SUFFIX, scale)
        else:
            writer.add(name, tensor)
    writer.close()
    for f in in_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX_FILE):
            shutil.copy2(f, out_dir / f.name)
    raw["quantization_config"] = {"quant_method": INT8_METHOD, "bits": 8}
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    log.info("wrote int8 checkpoint %s (%d tensors quantized)", out_dir, len(int8_sources))
    return out_dir


class ShardWriter:
    """Accumulates tensors into safetensors shards of at most ~`shard_bytes`, then writes the index."""

    def __init__(self, out_dir: Path, shard_bytes: int) -> None:
        self.out_dir, self.shard_bytes = out_dir, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.pending and self.pending_bytes + tensor.nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.nbytes

    def _flush(self) -> None:
        save_file(self.pending, self.out_dir / f"shard-{len(self.shards)}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            (self.out_dir / "shard-0.tmp").rename(self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.out_dir / f"shard-{i}.tmp").rename(self.out_dir / fname)
            weight_map.update(dict.fromkeys(names, fname))
        (self.out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
