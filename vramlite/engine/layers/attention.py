"""Attention over the KV cache for a packed batch of decode tokens and prefill chunks.

A step's tokens are packed into one [N, ...] tensor: first one token for each
decoding sequence, then each prefill chunk's tokens in turn. Linear layers see
no padding; attention runs once for all decode tokens (batched over slots) and
once per prefill chunk. The runner builds `AttentionMetadata` once per step.

Encoder-decoder models add an additive position bias (`AttentionBias`, which
then carries the causal and length masks too) and cross-attention over a
second cache holding each slot's encoder keys and values (`CrossMetadata`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from vramlite.kernels import Backend, backend_for, decode_attention

_GPU_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_backends(device: torch.device) -> AbstractContextManager:
    """The kernels a forward pass on `device` lets SDPA choose: on CUDA flash, memory-efficient or math, never
    cuDNN's.

    Recent torch tries cuDNN's attention first on sm90 and sm100 (H100, H200, B200). cuDNN builds an execution
    graph for each new problem, keyed by the batch and the key length among others, at 23-37 ms of host time
    each: one sequence's decode steps, whose key length grows by one a step, would build one every step (all
    of the step's layers share it), and each new prompt length another. The flags are process-wide and set for
    the pass only (~13 us).
    """
    return sdpa_kernel(_GPU_SDPA_BACKENDS) if device.type == "cuda" else nullcontext()


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
    cross: CrossMetadata | None = None  # encoder-decoder models only
    # decode token i attends to positions 0..positions[i] of slot write_slots[i], all of them: what the decode
    # attention kernel computes (False: a sliding window's band or ring, which decode_mask carries)
    decode_by_length: bool = True


@dataclass
class EncoderBatch:
    """The encoder inputs of one step, packed: sequence i's tokens are [spans[i]) and go to cache slot slots[i]."""

    input_ids: torch.Tensor  # [M]
    positions: torch.Tensor  # [M] position of each token in its own input
    write_slots: torch.Tensor  # [M] cache slot of each token
    spans: list[tuple[int, int]]


@dataclass
class CrossMetadata:
    """What the decoder tokens of a step attend to in the cross cache (each slot's encoder output)."""

    encoder: EncoderBatch | None  # inputs to encode this step (their K/V are written before being read)
    decode_len: int  # longest encoder output among the decode tokens' slots
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, decode_len] bool, True = attend; None if lengths are equal
    prefill_lens: list[int]  # encoder length of each prefill chunk's slot


@dataclass
class AttentionBias:
    """Additive attention bias [heads, ...] with the masks folded in (-inf where a query may not attend)."""

    decode: torch.Tensor | None  # [Bd, heads, decode_kv_len]
    prefills: list[torch.Tensor]  # [1, heads, t, kv_len] per prefill chunk


def windowed(meta: AttentionMetadata, window: int, cache_length: int) -> AttentionMetadata:
    """`meta` for a layer whose queries see only the `window` latest positions, their own included (a sliding
    window, as transformers defines it), over a cache of `cache_length` positions per slot.

    Where the cache holds the whole context, the masks also hide keys at or before position - window (keys wholly
    outside the window are masked rather than skipped). Where it is a ring (`KVCache`: position p at
    p mod `cache_length`), keys are written there, every ring entry is read, and the masks keep the entries whose
    position (the latest written there) is inside each query's window.
    """
    ring = cache_length
    positions = meta.positions
    decode_kv_len, decode_mask = meta.decode_kv_len, meta.decode_mask
    nd = meta.num_decode
    # compiled, always masked: a test of the length would compile a second graph once sequences outgrow the window
    banded = nd > 0 and (torch.compiler.is_compiling() or decode_kv_len > window)
    if banded:
        queries = positions[:nd, None]
        if decode_kv_len > ring:
            decode_kv_len, decode_mask = ring, _ring_mask(queries, queries + 1, window, ring)[:, None, None, :]
        else:
            keys = torch.arange(decode_kv_len, device=positions.device)
            band = (keys > queries - window)[:, None, None, :]
            decode_mask = band if decode_mask is None else band & decode_mask
    prefills = []
    for chunk in meta.prefills:
        if chunk.kv_len > window:
            queries = positions[chunk.start : chunk.end, None]
            if chunk.kv_len > ring:
                chunk = replace(chunk, kv_len=ring, mask=_ring_mask(queries, chunk.kv_len, window, ring))
            else:
                keys = torch.arange(chunk.kv_len, device=queries.device)
                chunk = replace(chunk, mask=(keys <= queries) & (keys > queries - window))
        prefills.append(chunk)
    if meta.decode_kv_len > ring or any(c.kv_len > ring for c in meta.prefills):
        positions = positions % ring  # where each token's keys and values go
    return replace(meta, positions=positions, decode_kv_len=decode_kv_len, decode_mask=decode_mask,
                   prefills=prefills, decode_by_length=meta.decode_by_length and not banded)


def window_metas(meta: AttentionMetadata, layer_windows: Sequence[int | None], cache_k: Sequence[torch.Tensor]
                 ) -> dict[int, AttentionMetadata]:
    """`windowed` metadata for each sliding window among a model's layers (`layer_windows`, as many as the
    cache's layers, or none), over the cache length of the layers that have it."""
    metas: dict[int, AttentionMetadata] = {}
    for window, cache in zip(layer_windows, cache_k, strict=False):
        if window is not None and window not in metas:
            metas[window] = windowed(meta, window, cache.shape[2])
    return metas


def _ring_mask(queries: torch.Tensor, lengths: torch.Tensor | int, window: int, ring: int) -> torch.Tensor:
    """Which entries [ring] of a ring cache each query [Q, 1] (an absolute position) may attend to, its
    sequence's first `lengths` positions ([Q, 1], or one int) having been written: entry i holds position
    p = i + ring * floor((length - 1 - i) / ring), the latest written there (none where p < 0)."""
    entries = torch.arange(ring, device=queries.device)
    held = entries + ring * torch.div(lengths - 1 - entries, ring, rounding_mode="floor")
    return (held >= 0) & (held <= queries) & (held > queries - window)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                     cache_v: torch.Tensor, meta: AttentionMetadata, scale: float | None = None,
                     bias: AttentionBias | None = None, softcap: float | None = None) -> torch.Tensor:
    """Write k, v [N, kv_heads, D] into one layer's cache [slots, kv_heads, positions, D] (the context's, or a
    ring's: see `windowed`), then attend.

    q is [N, heads, D]; returns [N, heads, D]. Grouped-query attention never
    materializes repeated K/V. Scores are scaled by `scale` (default D**-0.5)
    and, with `softcap`, squashed to softcap·tanh(score / softcap) (Gemma 2);
    a `bias` replaces the causal and length masks.
    """
    cache_k[meta.write_slots, :, meta.positions] = k
    cache_v[meta.write_slots, :, meta.positions] = v
    nd = meta.num_decode
    if not meta.prefills:
        return _cached_decode(q, cache_k, cache_v, meta, scale, bias, softcap)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _cached_decode(q[:nd], cache_k, cache_v, meta, scale, bias, softcap)
    for i, chunk in enumerate(meta.prefills):
        qc = q[chunk.start : chunk.end].transpose(0, 1)
        kc = cache_k[chunk.slot, :, : chunk.kv_len]
        vc = cache_v[chunk.slot, :, : chunk.kv_len]
        chunk_mask = chunk.mask if bias is None else bias.prefills[i]
        if softcap is not None:
            o = _softcapped(qc, kc, vc, chunk_mask, scale, softcap)
        else:
            o = F.scaled_dot_product_attention(qc[None], kc[None], vc[None], attn_mask=chunk_mask,
                                               is_causal=chunk_mask is None, enable_gqa=gqa, scale=scale)[0]
        out[chunk.start : chunk.end] = o.transpose(0, 1)
    return out


def _cached_decode(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, meta: AttentionMetadata,
                   scale: float | None, bias: AttentionBias | None, softcap: float | None) -> torch.Tensor:
    """The decode tokens' queries q [num_decode, heads, D] over their slots in one layer's cache.

    On a GPU with the Triton kernels, a batch of sequences that attend to all of their positions takes the
    decode attention kernel (`vramlite.kernels.attention`): it reads each slot's keys in place, up to its
    own length, in one launch, where the batched matmuls below first copy the slots out (unless consecutive)
    padded to the longest, and launch five or six ops. One sequence keeps SDPA (flash attention on sm80+).
    """
    if (len(q) > 1 and bias is None and softcap is None and meta.decode_by_length and type(cache_k) is torch.Tensor
            and backend_for(q.device) is not Backend.REFERENCE):
        nd = meta.num_decode
        return decode_attention(q, cache_k, cache_v, meta.write_slots[:nd], meta.positions[:nd],
                                q.shape[-1] ** -0.5 if scale is None else scale, meta.decode_kv_len)
    kv_len, slots = meta.decode_kv_len, meta.decode_slots
    return _decode(q, cache_k[slots, :, :kv_len], cache_v[slots, :, :kv_len],
                   meta.decode_mask if bias is None else None, scale, None if bias is None else bias.decode, softcap)


def _softcapped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float | None, softcap: float) -> torch.Tensor:
    """One prefill chunk's attention, q [heads, t, D] over k, v [kv_heads, L, D], with capped scores (which SDPA
    cannot apply). `mask` [t, L] (True = attend); None: causal, the chunk starting its sequence."""
    heads, t, d = q.shape
    kv_heads, length = k.shape[0], k.shape[1]
    group = heads // kv_heads
    scores = torch.matmul(q.reshape(kv_heads, group * t, d), k.transpose(1, 2)) * (d**-0.5 if scale is None
                                                                                     else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)
    scores = scores.view(kv_heads, group, t, length).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs.view(kv_heads, group * t, length), v).view(heads, t, d)


def cross_attention(q: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, meta: AttentionMetadata,
                    scale: float | None = None) -> torch.Tensor:
    """Decoder queries q [N, heads, D] over their slots' encoder K/V in one layer's cross cache
    [slots, heads, context, D] (no position bias, no causal mask)."""
    cross = meta.cross
    nd, slots, length = meta.num_decode, meta.decode_slots, cross.decode_len
    if not meta.prefills:
        return _decode(q, cross_k[slots, :, :length], cross_v[slots, :, :length], cross.decode_mask, scale)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode(q[:nd], cross_k[slots, :, :length], cross_v[slots, :, :length], cross.decode_mask,
                           scale)
    for chunk, n in zip(meta.prefills, cross.prefill_lens, strict=True):
        qc = q[chunk.start : chunk.end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qc, cross_k[chunk.slot, :, :n].unsqueeze(0),
                                           cross_v[chunk.slot, :, :n].unsqueeze(0), scale=scale)
        out[chunk.start : chunk.end] = o[0].transpose(0, 1)
    return out


def _decode(q: torch.Tensor, kd: torch.Tensor, vd: torch.Tensor, mask: torch.Tensor | None,
            scale: float | None = None, bias: torch.Tensor | None = None,
            softcap: float | None = None) -> torch.Tensor:
    """One query per sequence over its K/V kd, vd [B, kv_heads, L, D]: for a batch, two small batched matmuls
    beat SDPA's kernels (on CPU by 1.1-1.7x at B = 8); for one sequence, SDPA wins (10 vs 15 us).

    Query heads are grouped under their KV head ([B * kv_heads, group, D]) so
    grouped-query attention reads each cached K/V once; a cache slice of
    consecutive slots merges B and kv_heads without a copy. `mask` [B, 1, 1, L]
    (True = attend), `bias` [B, heads, L] and `softcap` are optional.
    """
    b, heads, d = q.shape
    kv_heads, length = kd.shape[1], kd.shape[2]
    group = heads // kv_heads
    if b == 1 and mask is None and bias is None and softcap is None:
        # one sequence: its query heads are SDPA's query rows, 1.5x faster
        # (reshape: on CUDA, q and SDPA's output may come with strides a view cannot take)
        o = F.scaled_dot_product_attention(q.reshape(1, kv_heads, group, d), kd, vd, scale=scale)
        return o.reshape(1, heads, d)
    scores = torch.baddbmm(q.new_empty(1, 1, 1), q.reshape(b * kv_heads, group, d),
                           kd.reshape(b * kv_heads, length, d).transpose(1, 2), beta=0,
                           alpha=d**-0.5 if scale is None else scale)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.view(b, kv_heads, group, length).masked_fill(~mask, float("-inf")).view(scores.shape)
    if bias is not None:
        scores = scores + bias.reshape(scores.shape)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.bmm(probs, vd.reshape(b * kv_heads, length, d)).view(b, heads, d)


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[tuple[int, int]],
                            bias: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Full (non-causal) attention within each span of packed q, k, v [N, heads, D], with no cache.

    `bias` [1, heads, L, L] covers the longest span; a span of length n uses its top-left n×n corner.
    """
    out = torch.empty_like(q)
    for start, end in spans:
        n = end - start
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        mask = None if bias is None else bias[:, :, :n, :n]
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)[0].transpose(0, 1)
    return out
