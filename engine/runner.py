"""The model runner: owns the model and its KV cache, turns scheduled chunks into logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from engine.layers.attention import AttentionMetadata, CrossMetadata, EncoderBatch, PrefillChunk
from engine.layers.linear import prefer_cpu_layout
from engine.models.base import CausalLM


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence: `token_ids` go at positions start, start+1, ... of cache `slot`.

    For an encoder-decoder model, `token_ids` are decoder tokens; `encoder_ids`
    (given once, with the sequence's first decoder tokens) is the encoder's
    whole input, encoded in this step into the slot's cross cache.
    """

    slot: int
    token_ids: Sequence[int]
    start: int
    encoder_ids: Sequence[int] = ()


class ModelRunner:
    """Runs one forward pass over a packed batch of chunks (decode tokens and prefill pieces mixed)."""

    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype, num_slots: int,
                 context: int) -> None:
        cfg = model.config
        prefer_cpu_layout(model, batch_hint=num_slots)
        self.model = model
        self.device = device
        self.dtype = dtype
        self.context = context
        self.cache = KVCache(cfg.num_layers, num_slots, context + cfg.cache_prefix, cfg.num_kv_heads, cfg.head_dim,
                             dtype, device, cross_context=context if cfg.is_encoder_decoder else 0)

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
            if c.encoder_ids and (self.cache.cross_k is None or len(c.encoder_ids) > self.context):
                raise ValueError(f"encoder input of {len(c.encoder_ids)} tokens: the model has no encoder or "
                                 f"the input does not fit {self.context}")
        # Decode tokens first (sorted by slot so a batch in consecutive slots is read as a view). A sequence's
        # first chunk is a prefill even when it is one token: a model may put more in front of it (CPM-Ant's
        # prompt tokens), and a decode step reads only what is already cached.
        is_decode = [len(c.token_ids) == 1 and c.start > 0 for c in chunks]
        decode = sorted((i for i, d in enumerate(is_decode) if d), key=lambda i: chunks[i].slot)
        prefill = [i for i, d in enumerate(is_decode) if not d]
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
            if not is_decode[i]:
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
        if self.cache.cross_k is None:
            return self.model(ids, meta, (self.cache.k, self.cache.v)), spans
        meta.cross = self._cross_metadata([chunks[i] for i in decode], [chunks[i] for i in prefill])
        return self.model(ids, meta, (self.cache.k, self.cache.v, self.cache.cross_k, self.cache.cross_v)), spans

    def _cross_metadata(self, decode: list[Chunk], prefill: list[Chunk]) -> CrossMetadata:
        """Records the encoder lengths of this step's new inputs, then what each decoder chunk attends to."""
        encoding = [c for c in (*decode, *prefill) if c.encoder_ids]
        for c in encoding:
            self.cache.cross_lens[c.slot] = len(c.encoder_ids)
        lens = self.cache.cross_lens
        empty = [c.slot for c in (*decode, *prefill) if not lens[c.slot]]
        if empty:
            raise ValueError(f"slot {empty[0]} has no encoder output: its first chunk must carry encoder_ids")
        encoder = None
        if encoding:
            spans, ids, positions, slots = [], [], [], []
            for c in encoding:
                spans.append((len(ids), len(ids) + len(c.encoder_ids)))
                ids.extend(c.encoder_ids)
                positions.extend(range(len(c.encoder_ids)))
                slots.extend([c.slot] * len(c.encoder_ids))
            encoder = EncoderBatch(*(torch.tensor(t, device=self.device) for t in (ids, positions, slots)), spans)
        decode_lens = [lens[c.slot] for c in decode]
        return CrossMetadata(encoder, max(decode_lens, default=0), self._decode_mask(decode_lens),
                             [lens[c.slot] for c in prefill])

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
