"""Attention over the KV cache for a packed batch of decode tokens and prefill chunks.

A step's tokens are packed into one [N, ...] tensor: first one token for each
decoding sequence, then each prefill chunk's tokens in turn. Linear layers see
no padding; attention runs once for all decode tokens (batched over slots) and
once per prefill chunk. The runner builds `AttentionMetadata` once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    """Tokens [start, end) of the packed batch extend `slot` from position `kv_len - (end - start)`."""

    start: int
    end: int
    slot: int
    kv_len: int
    mask: torch.Tensor | None  # [t, kv_len] bool; None when the chunk starts at position 0 (plain causal)


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query may attend to, for one step."""

    positions: torch.Tensor  # [N] absolute position of each packed token
    write_slots: torch.Tensor  # [N] cache slot of each packed token
    num_decode: int  # tokens [0, num_decode) are single decode tokens, one per sequence
    decode_slots: slice | torch.Tensor  # their slots, a slice when contiguous (a view, no gather)
    decode_kv_len: int  # longest K/V length among them, after this step's write
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, decode_kv_len] bool, True = attend; None if lengths are equal
    prefills: list[PrefillChunk]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Write k, v [N, kv_heads, D] into one layer's cache [slots, kv_heads, context, D], then attend.

    q is [N, heads, D]; returns [N, heads, D]. Grouped-query attention never
    materializes repeated K/V.
    """
    cache_k[meta.write_slots, :, meta.positions] = k
    cache_v[meta.write_slots, :, meta.positions] = v
    nd = meta.num_decode
    if not meta.prefills:
        return _decode(q, cache_k, cache_v, meta)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode(q[:nd], cache_k, cache_v, meta)
    for chunk in meta.prefills:
        qc = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        kc = cache_k[chunk.slot, :, : chunk.kv_len].unsqueeze(0)
        vc = cache_v[chunk.slot, :, : chunk.kv_len].unsqueeze(0)
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=chunk.mask, is_causal=chunk.mask is None,
                                           enable_gqa=gqa)
        out[chunk.start : chunk.end] = o[0].transpose(0, 1)
    return out


def _decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: AttentionMetadata
            ) -> torch.Tensor:
    """One query per sequence: two small batched matmuls beat SDPA's kernels here (on CPU by ~10x).

    Query heads are grouped under their KV head ([B, kv_heads, group, D]) so
    grouped-query attention reads each cached K/V once.
    """
    kd = cache_k[meta.decode_slots, :, : meta.decode_kv_len]
    vd = cache_v[meta.decode_slots, :, : meta.decode_kv_len]
    b, heads, d = q.shape
    qg = q.view(b, kd.shape[1], heads // kd.shape[1], d)
    scores = torch.matmul(qg, kd.transpose(-1, -2)) * d**-0.5
    if meta.decode_mask is not None:
        scores = scores.masked_fill(~meta.decode_mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, vd).view(b, heads, d)
