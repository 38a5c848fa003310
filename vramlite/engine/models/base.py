"""What every model family provides to the runner, and the weight loading they share."""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vramlite.engine.config import ModelConfig
from vramlite.engine.layers.attention import AttentionMetadata
from vramlite.engine.layers.embedding import Embedding
from vramlite.engine.layers.linear import QuantizedLinear
from vramlite.engine.weights import CheckpointReader
from vramlite.kernels import quantize_weight

if TYPE_CHECKING:
    from vramlite.engine.offload import WeightStore

Place = Callable[[nn.Module, str, torch.Tensor], torch.Tensor]  # (module, attribute, loaded tensor) → what to bind


def keep(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The default `Place`: a loaded tensor stays where it was loaded."""
    return tensor

SCALE_SUFFIX = "_scale"  # int8 checkpoints store `name` as int8 and `name + SCALE_SUFFIX` as fp32 [out]


@dataclass(frozen=True)
class WeightSpec:
    """One parameter and where it comes from: checkpoint tensors stacked along rows (output features).

    `shapes` are the checkpoint shapes expected from config.json; `transposed`
    marks HF's Conv1D layout ([in, out]), turned to [out, in] at load.
    """

    module: nn.Module
    param: str
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    transposed: bool = False


class CausalLM(nn.Module, ABC):
    """A decoder stack over a packed batch: `forward` gives hidden states, `compute_logits` the scores.

    Families are built on the `meta` device and filled by `load_weights`, so a
    model's parameters exist once, already in their final dtype and device; an
    int8 layer is quantized as soon as its weight is read, layer by layer.
    """

    config: ModelConfig
    lm_head: nn.Linear | QuantizedLinear  # int8 under quantize="int8", like the blocks' linears
    offload: WeightStore | None = None  # set by the loader under a memory limit

    @staticmethod
    @abstractmethod
    def parse_config(raw: dict[str, Any]) -> ModelConfig:
        """Normalize an HF config.json of this family."""

    @abstractmethod
    def weight_specs(self, reader: CheckpointReader) -> Iterator[WeightSpec]:
        """Every parameter to read (HF checkpoint names), layer by layer; the LM head is the base's."""

    @abstractmethod
    def blocks(self) -> nn.ModuleList:
        """The decoder layers, in forward order."""

    def step_start(self) -> int:
        """The first of `blocks()` that every forward pass runs (the offload's copies cycle back to it)."""
        return 0

    @abstractmethod
    def input_embeddings(self) -> Embedding:
        """The token embedding, which an LM head without weights of its own is tied to."""

    @abstractmethod
    def setup(self, context: int, device: torch.device, dtype: torch.dtype) -> None:
        """Build non-parameter state (position tables) for a cache of `context` positions."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        """Hidden states [N, hidden] for packed tokens [N]; cache is (k, v), per layer [slots, ...]."""

    @abstractmethod
    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm: `forward`'s hidden states [B, hidden] as the LM head reads them (what transformers'
        base models return as `last_hidden_state`; embeddings pool these)."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [B, hidden] → [B, vocab]."""
        return self.lm_head(self.final_hidden(hidden))

    def decoder_layers(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, nn.Module]]:
        """(index, layer) of `blocks()[start:stop]` in forward order, for the family's forward loop.

        Under offload, a streamed layer's weights are in its device slot while
        the loop body runs, and its slot is handed back when the next item is asked for.
        """
        blocks = self.blocks()
        streamer = self.offload.streamer if self.offload is not None else None
        indices = range(start, len(blocks) if stop is None else stop)
        if streamer is None:
            for i in indices:
                yield i, blocks[i]
            return
        for i in indices:
            streamer.before(i)
            yield i, blocks[i]
            streamer.after(i)

    def load_weights(self, reader: CheckpointReader, device: torch.device, dtype: torch.dtype,
                     place: Place = keep, host: Collection[nn.Module] = ()) -> None:
        """Read every parameter from the checkpoint, checking shapes; quantize int8 layers as they come.

        `place` decides where each loaded tensor ends up (the offload's host
        arena for a streamed layer); by default it stays on `device`. The
        modules in `host` load into host memory and stay there.
        """
        cpu = torch.device("cpu")
        for spec in self.all_weight_specs(reader):
            if isinstance(spec.module, QuantizedLinear) and spec.param == "weight":
                q, scale = load_int8(spec, reader, device)
                spec.module.set_weight(place(spec.module, "qweight", q), place(spec.module, "scale", scale))
                continue
            parts = [read(reader, name, shape, spec.transposed) for name, shape in zip(spec.sources, spec.shapes,
                                                                                         strict=True)]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
            tensor = place(spec.module, spec.param,
                           tensor.to(device=cpu if spec.module in host else device, dtype=dtype))
            setattr(spec.module, spec.param, nn.Parameter(tensor, requires_grad=False))
        if self.head_is_tied(reader):
            self._tie_head(device)

    def all_weight_specs(self, reader: CheckpointReader) -> Iterator[WeightSpec]:
        """`weight_specs`, then the LM head's own weight when the checkpoint has one."""
        return itertools.chain(self.weight_specs(reader), self._head_spec(reader))

    def head_is_tied(self, reader: CheckpointReader) -> bool:
        """Whether the LM head is made from the embedding (tied, or the checkpoint has no head)."""
        return not any(self._head_spec(reader))

    def head_shares_embedding(self, reader: CheckpointReader) -> bool:
        """Whether the LM head is the embedding's very tensor: tied and not int8 (an int8 head is a copy)."""
        return self.head_is_tied(reader) and not isinstance(self.lm_head, QuantizedLinear)

    def _tie_head(self, device: torch.device) -> None:
        """The head from the embedding's first `vocab_size` rows (all of them but for CPM-Ant's prompt tokens):
        the same tensor, or its int8 copy on `device`."""
        table = self.input_embeddings().weight
        rows = table[: self.config.vocab_size]
        if isinstance(self.lm_head, QuantizedLinear):  # quantized where the table is, then moved
            self.lm_head.set_weight(*(t.to(device) for t in quantize_weight(rows)))
        else:
            self.lm_head.weight = table if rows.shape == table.shape else nn.Parameter(rows, requires_grad=False)

    def _head_spec(self, reader: CheckpointReader) -> Iterator[WeightSpec]:
        """The LM head's own weight, when it is not tied to the embedding and the checkpoint has one."""
        if not self.config.tie_word_embeddings and "lm_head.weight" in reader:
            shape = (self.config.vocab_size, self.config.hidden_size)
            yield WeightSpec(self.lm_head, "weight", ("lm_head.weight",), (shape,))


def read(reader: CheckpointReader, name: str, shape: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """A float tensor in [out, in] layout (int8 tensors only ever go to a QuantizedLinear, via `load_int8`)."""
    tensor = reader.get(name, shape)
    return tensor.t() if transposed else tensor


def load_int8(spec: WeightSpec, reader: CheckpointReader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A QuantizedLinear's (qweight, fp32 scale): int8 tensors of an int8 checkpoint as they are, float ones
    quantized on `device`."""
    qweights, scales = [], []
    for name, shape in zip(spec.sources, spec.shapes, strict=True):
        tensor = reader.get(name, shape)
        if tensor.dtype == torch.int8:
            out_features = shape[1] if spec.transposed else shape[0]
            q, s = tensor.to(device), reader.get(name + SCALE_SUFFIX, (out_features,)).to(device)
            q = q.t() if spec.transposed else q
        else:
            tensor = tensor.to(device)
            q, s = quantize_weight(tensor.t() if spec.transposed else tensor)
        qweights.append(q)
        scales.append(s)
    return torch.cat(qweights), torch.cat(scales).float()
