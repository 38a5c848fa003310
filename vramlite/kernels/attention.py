"""Decode attention over a slot-indexed KV cache: one query token per sequence, each over its own slot's keys.

The cache is [slots, kv_heads, positions, D]; sequence b's query sits at position `positions[b]` of slot
`slots[b]` and attends to positions 0..positions[b] there (its keys already written). The kernel reads each
sequence's keys and values in place and only up to its own length: no gather of the batch's slots into a
padded copy, no mask, one launch for what torch does in five or six (`decode_attention_ref`).
"""

import functools

import torch

from ._common import FLOAT_DTYPES, HAS_TRITON, jit, launch, tl

if HAS_TRITON:
    import triton


def decode_attention_ref(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float) -> torch.Tensor:
    """Torch reference: q [B, heads, D] over cache_k/v [slots, kv_heads, positions, D] → [B, heads, D], in fp32
    and rounded to q's dtype. Query head h reads KV head h // (heads // kv_heads)."""
    b, heads, d = q.shape
    kv_heads = cache_k.shape[1]
    lengths = positions.long() + 1
    length = int(lengths.max())
    k = cache_k[slots.long(), :, :length].float()
    v = cache_v[slots.long(), :, :length].float()
    scores = torch.einsum("bhgd,bhld->bhgl", q.float().view(b, kv_heads, heads // kv_heads, d), k) * scale
    hidden = torch.arange(length, device=q.device) >= lengths[:, None]
    probs = scores.masked_fill(hidden[:, None, None, :], float("-inf")).softmax(dim=-1)
    return torch.einsum("bhgl,bhld->bhgd", probs, v).reshape(b, heads, d).to(q.dtype)


@jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, m_ptr, l_ptr, slots_ptr, positions_ptr,
    scale, split_len,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_kp, stride_vs, stride_vh, stride_vp, stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # One program per (sequence, query head, piece of split_len keys): an online softmax over blocks of BLOCK_N
    # keys, in fp32 (Pascal: no fp16 math). The heads of a group read the same keys, mostly from L2. With SPLIT,
    # each piece writes its unnormalized sum, running max and denominator for `_merge_pieces` (flash-decoding);
    # a piece past its sequence's end writes an empty softmax (max -inf, sums 0).
    b = tl.program_id(0)
    head = tl.program_id(1)
    piece = tl.program_id(2)
    slot = tl.load(slots_ptr + b).to(tl.int64)
    start = piece * split_len
    end = tl.minimum(tl.load(positions_ptr + b).to(tl.int32) + 1, start + split_len)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + head * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
    k_base = k_ptr + slot * stride_ks + (head // GROUP) * stride_kh
    v_base = v_ptr + slot * stride_vs + (head // GROUP) * stride_vh
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kp + offs_d[None, :], mask=tile_mask, other=0.0)
        s = tl.where(n_mask, tl.sum(q[None, :] * k.to(tl.float32), axis=1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + offs_n[:, None] * stride_vp + offs_d[None, :], mask=tile_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = o_ptr + b * stride_ob + head * stride_oh
    if SPLIT:
        pieces = tl.num_programs(2)
        row = (b * tl.num_programs(1) + head) * pieces + piece
        tl.store(out + piece * HEAD_DIM + offs_d, acc, mask=d_mask)
        tl.store(m_ptr + row + tl.arange(0, 1), m_i)
        tl.store(l_ptr + row + tl.arange(0, 1), l_i)
    else:
        tl.store(out + offs_d, (acc / l_i).to(o_ptr.dtype.element_ty), mask=d_mask)


def _config(head_dim: int) -> "triton.Config":
    """Key tiles of BLOCK_N × BLOCK_D fp32 values, at most 64 a thread of 4 warps, at most 128 keys."""
    block_d = triton.next_power_of_2(head_dim)
    return triton.Config({"BLOCK_N": min(128, max(16, 8192 // block_d)), "BLOCK_D": block_d}, num_warps=4,
                         num_stages=2)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def pieces_for(programs: int, max_length: int, block_n: int, multiprocessors: int) -> int:
    """How many pieces to split each sequence's keys into: enough programs for two per multiprocessor, each
    piece at least four key blocks long, at most 16 pieces."""
    wanted = -(-2 * multiprocessors // max(programs, 1))
    return max(1, min(wanted, max_length // (4 * block_n), 16))


def _merge_pieces(acc: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sums [..., pieces, D] with their maxima and denominators [..., pieces] → [..., D]."""
    weight = torch.exp(m - m.amax(dim=-1, keepdim=True))  # an empty piece (max -inf) weighs 0
    return (acc * weight.unsqueeze(-1)).sum(dim=-2) / (l_sum * weight).sum(dim=-1, keepdim=True)


def decode_attention_triton(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor,
                            positions: torch.Tensor, scale: float, max_length: int | None = None,
                            pieces: int | None = None) -> torch.Tensor:
    """The kernel on `decode_attention_ref`'s operands (all on one GPU; q's and the caches' last dims contiguous).

    `max_length`, at least the longest sequence's length (default: the cache's), sizes the pieces: `pieces`
    splits each sequence's keys into that many, merged after (default: `pieces_for` this GPU; on the CPU, one),
    so that several programs share a long sequence where the batch alone would not fill the GPU."""
    b, heads, d = q.shape
    if q.dtype not in FLOAT_DTYPES or cache_k.dtype != q.dtype or cache_v.dtype != q.dtype:
        raise ValueError(f"q and the caches must share one float dtype, got {q.dtype}, {cache_k.dtype}, "
                         f"{cache_v.dtype}")
    if cache_k.dim() != 4 or cache_v.shape != cache_k.shape or cache_k.shape[3] != d or heads % cache_k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} does not fit caches {tuple(cache_k.shape)} / {tuple(cache_v.shape)}")
    if slots.shape != (b,) or positions.shape != (b,):
        raise ValueError(f"slots and positions must be [{b}], got {tuple(slots.shape)} and {tuple(positions.shape)}")
    if any(t.stride(-1) != 1 for t in (q, cache_k, cache_v)):
        raise ValueError("q and the caches must be contiguous in their last dimension")
    if not b:
        return q.new_empty(0, heads, d)
    config = _config(d)
    block_n = config.kwargs["BLOCK_N"]
    max_length = cache_k.shape[2] if max_length is None else max_length
    if pieces is None:
        cuda = q.device.type == "cuda"
        pieces = pieces_for(b * heads, max_length, block_n, _multiprocessors(q.device)) if cuda else 1
    split_len = -(-max(-(-max_length // pieces), 1) // block_n) * block_n  # a whole number of key blocks
    pieces = -(-max_length // split_len)
    if pieces == 1:
        out = torch.empty((b, heads, d), dtype=q.dtype, device=q.device)
        m = l_sum = out  # unread without SPLIT
    else:
        out = torch.empty((b, heads, pieces, d), dtype=torch.float32, device=q.device)
        m = torch.empty((b, heads, pieces), dtype=torch.float32, device=q.device)
        l_sum = torch.empty_like(m)
    launch(_decode_attention_kernel, (b, heads, pieces), config,
           q, cache_k, cache_v, out, m, l_sum, slots, positions, scale, split_len,
           q.stride(0), q.stride(1), *cache_k.stride()[:3], *cache_v.stride()[:3], out.stride(0), out.stride(1),
           GROUP=heads // cache_k.shape[1], HEAD_DIM=d, SPLIT=pieces > 1)
    return out if pieces == 1 else _merge_pieces(out, m, l_sum).to(q.dtype)
