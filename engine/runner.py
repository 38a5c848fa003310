"""The model runner: owns the model and its KV cache, turns scheduled chunks into logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from engine.layers.attention import AttentionMetadata, PrefillChunk
from engine.layers.linear import prefer_cpu_layout
from engine.models.base import CausalLM


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence: `token_ids` go at positions start, start+1, ... of cache `slot`."""

    slot: int
    token_ids: Sequence[int]
    start: int


class ModelRunner:
    """Runs one forward pass over a packed batch of chunks (decode tokens and prefill pieces mixed)."""

    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype, num_slots: int,
                 context: int) -> None:
        cfg = model.config
        prefer_cpu_layout(model)
        self.model = model
        self.device = device
        self.dtype = dtype
        self.context = context
        self.cache = KVCache(cfg.num_layers, num_slots, context, cfg.num_kv_heads, cfg.head_dim, dtype, device)

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """Logits [len(chunks), vocab] (fp32) for the last token of each chunk, in the given order."""
        hidden, spans = self._run(chunks)
        last = torch.tensor([end - 1 for _, end in spans], device=self.device)
        return self.model.compute_logits(hidden[last]).float()

    @torch.inference_mode()
    def forward_all(self, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        """Logits [len(tokens), vocab] for every token of each chunk (for tests and scoring)."""
        hidden, spans = self._run(chunks)
        logits = self.model.compute_logits(hidden).float()
        return [logits[s:e] for s, e in spans]

    def _run(self, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        for c in chunks:
            if not c.token_ids or c.start + len(c.token_ids) > self.context:
                raise ValueError(f"chunk of {len(c.token_ids)} tokens at {c.start} does not fit {self.context}")
        # Decode tokens first (sorted by slot so a batch in consecutive slots is read as a view).
        decode = sorted((i for i, c in enumerate(chunks) if len(c.token_ids) == 1), key=lambda i: chunks[i].slot)
        prefill = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1]
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[tuple[int, int]] = [(0, 0)] * len(chunks)
        prefills: list[PrefillChunk] = []
        for i in decode + prefill:
            c = chunks[i]
            n, begin = len(c.token_ids), len(tokens)
            tokens.extend(c.token_ids)
            positions.extend(range(c.start, c.start + n))
            slots.extend([c.slot] * n)
            spans[i] = (begin, begin + n)
            if n > 1:
                prefills.append(PrefillChunk(begin, begin + n, c.slot, c.start + n, self._chunk_mask(c.start, n)))
        meta = AttentionMetadata(
            positions=torch.tensor(positions, device=self.device),
            write_slots=torch.tensor(slots, device=self.device),
            num_decode=len(decode),
            decode_slots=self._slots([chunks[i].slot for i in decode]),
            decode_kv_len=max((chunks[i].start + 1 for i in decode), default=0),
            decode_mask=self._decode_mask([chunks[i].start + 1 for i in decode]),
            prefills=prefills,
        )
        ids = torch.tensor(tokens, device=self.device)
        return self.model(ids, meta, (self.cache.k, self.cache.v)), spans

    def _slots(self, slots: list[int]) -> slice | torch.Tensor:
        if slots and slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self.device)

    def _decode_mask(self, kv_lens: list[int]) -> torch.Tensor | None:
        if len(set(kv_lens)) <= 1:
            return None
        lens = torch.tensor(kv_lens, device=self.device)
        return (torch.arange(max(kv_lens), device=self.device) < lens[:, None])[:, None, None, :]

    def _chunk_mask(self, start: int, n: int) -> torch.Tensor | None:
        if start == 0:
            return None
        q_pos = torch.arange(start, start + n, device=self.device)
        return torch.arange(start + n, device=self.device)[None, :] <= q_pos[:, None]
