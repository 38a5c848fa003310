"""Rotary position embeddings (RoPE) with the common `rope_scaling` kinds."""

from __future__ import annotations

import math

import torch

from vramlite.engine.config import RopeConfig
from vramlite.engine.errors import ModelLoadError


def inv_frequencies(rope: RopeConfig, dim: int, max_position: int, context: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the attention (cos/sin) scale for `rope`, as transformers computes them.

    `dynamic` NTK scaling is applied once for the whole cache length `context`
    (transformers recomputes it as a sequence grows past `max_position`; the two
    agree whenever `context <= max_position`).
    """
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = rope.theta
    if rope.rope_type == "dynamic" and context > max_position:
        base *= (rope.factor * context / max_position - (rope.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        return _llama3(inv_freq, rope), 1.0
    if rope.rope_type == "yarn":
        return _yarn(inv_freq, rope, dim)
    if rope.rope_type == "longrope":
        return _longrope(rope, exponents, context)
    return inv_freq, 1.0


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    old_context = rope.original_max_position_embeddings
    low_wavelen = old_context / rope.low_freq_factor
    high_wavelen = old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rope.factor
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation, attention_factor


def _longrope(rope: RopeConfig, exponents: torch.Tensor, context: int) -> tuple[torch.Tensor, float]:
    """phi3's LongRoPE: each frequency stretched by its own factor, the long ones if the cache reaches past the
    original context, else the short ones. The choice holds for every position and sequence, as vLLM makes it:
    transformers switches a sequence to the long factors once it grows past the original context, re-encoding it;
    keys rotated by both sets in one sequence break attention."""
    factors = rope.long_factor if context > rope.original_max_position_embeddings else rope.short_factor
    if len(factors) != len(exponents):
        raise ModelLoadError(
            f"config.json: longrope needs {len(exponents)} short and long factors (half the rotated head "
            f"dimension), got {len(factors)}"
        )
    scale = rope.attention_factor
    if scale is None:
        scale = 1.0 if rope.factor <= 1 else math.sqrt(
            1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))
    return 1.0 / (torch.tensor(factors) * rope.theta**exponents), scale


class RotaryEmbedding:
    """cos and signed sin tables (see `apply_rotary`) for every position of the cache, gathered per token.

    With a partial rotary factor the tables cover only the rotated leading dimensions of a head.
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_position: int, context: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        dim = int(head_dim * rope.partial_rotary_factor)
        inv_freq, scale = inv_frequencies(rope, dim, max_position, context)
        freqs = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(device=device, dtype=dtype)
        # rotate_half(x) * sin == swap_halves(x) * [-sin, sin]: the sign lives in the table, not in a per-step neg.
        sin = emb.sin() * scale
        sin[:, : dim // 2].neg_()
        self.sin = sin.to(device=device, dtype=dtype)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, head_dim] for token positions [N] (broadcast over heads)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, head_dim] by the tables (transformers' rotate_half convention, with `sin`'s first
    half negated): x * cos + swap_halves(x) * sin, in three ops. Tables narrower than the head rotate its leading
    dimensions and pass the rest through."""
    n, heads, dim = x.shape
    rotated = cos.shape[-1]
    if rotated < dim:
        return torch.cat((apply_rotary(x[..., :rotated], cos, sin), x[..., rotated:]), dim=-1)
    swapped = x.reshape(n, heads, 2, dim // 2).flip(2).view(n, heads, dim)
    return torch.addcmul(x * cos, swapped, sin)
