"""T5-style encoder-decoders: t5 (original and v1.1) and mt5.

Relative position bias (bucketed, one table per stack, shared by its layers),
unscaled attention scores, RMSNorm without mean subtraction, no biases, a ReLU
or gated-GELU feed-forward. A prompt is the encoder's input: it runs once, at
the sequence's first step, and each decoder layer writes its cross-attention
keys and values of it into the cross cache of the sequence's slot; decode
steps then batch like a decoder-only model's.

`blocks()` is the encoder's layers then the decoder's, the order they run in,
so the offload streamer can stream either; a step with nothing to encode
skips the encoder's layers (the streamer reloads a slot it prefetched for them).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vramlite.engine.config import ModelConfig, common_fields, require
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.layers.embedding import Embedding
from vramlite.engine.layers.attention import (
    AttentionBias,
    AttentionMetadata,
    EncoderBatch,
    bidirectional_attention,
    cached_attention,
    cross_attention,
)
from vramlite.engine.layers.linear import make_linear
from vramlite.engine.layers.norm import RMSNorm
from vramlite.engine.layers.relative_position import RelativePositionBias
from vramlite.engine.models.base import CausalLM, WeightSpec
from vramlite.engine.weights import CheckpointReader

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "silu": F.silu}
SCALE = 1.0  # T5 does not scale q·k: the scale is folded into its initialization


def feed_forward_kind(raw: dict[str, Any]) -> tuple[bool, str]:
    """(gated, activation) from `feed_forward_proj`, as transformers reads it ("gated-gelu" means tanh GELU)."""
    proj = raw.get("feed_forward_proj", "gated-gelu" if raw.get("model_type") == "mt5" else "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated"
    act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and not gated) or act not in ACTIVATIONS:
        raise ModelLoadError(f"config.json: feed_forward_proj {proj!r} is not supported "
                             f"(relu, gated-gelu, or [gated-]{{{', '.join(ACTIVATIONS)}}})")
    return gated, act


class FeedForward(nn.Module):
    """wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated (wi_0 and wi_1 fused into `wi`)."""

    def __init__(self, cfg: ModelConfig, gated: bool) -> None:
        super().__init__()
        self.gated, self.inner = gated, cfg.intermediate_size
        self.wi = make_linear(cfg.hidden_size, (2 if gated else 1) * self.inner, False, cfg.quantization)
        self.wo = make_linear(self.inner, cfg.hidden_size, False, cfg.quantization)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.wo(self.act(self.wi(x)))
        gate, linear = self.wi(x).split(self.inner, dim=-1)
        return self.wo(self.act(gate) * linear)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.qkv = make_linear(cfg.hidden_size, 3 * inner, False, cfg.quantization)
        self.o = make_linear(inner, cfg.hidden_size, False, cfg.quantization)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v [N, heads, head_dim]."""
        return self.qkv(x).view(-1, 3 * self.num_heads, self.head_dim).split(self.num_heads, dim=1)


class CrossAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.q = make_linear(cfg.hidden_size, inner, False, cfg.quantization)
        self.kv = make_linear(cfg.hidden_size, 2 * inner, False, cfg.quantization)
        self.o = make_linear(inner, cfg.hidden_size, False, cfg.quantization)

    def write(self, encoded: torch.Tensor, encoder: EncoderBatch, cross_k: torch.Tensor,
              cross_v: torch.Tensor) -> None:
        """Project the encoder output [M, hidden] to keys and values in its slots of the cross cache."""
        k, v = self.kv(encoded).view(-1, 2 * self.num_heads, self.head_dim).split(self.num_heads, dim=1)
        cross_k[encoder.write_slots, :, encoder.positions] = k
        cross_v[encoder.write_slots, :, encoder.positions] = v

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cross_k: torch.Tensor,
                cross_v: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(-1, self.num_heads, self.head_dim)
        return self.o(cross_attention(q, cross_k, cross_v, meta, SCALE).flatten(1))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, gated: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.ff_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ff = FeedForward(cfg, gated)

    def forward(self, x: torch.Tensor, spans: list[tuple[int, int]], bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.attn.project(self.attn_norm(x))
        x = x + self.attn.o(bidirectional_attention(q, k, v, spans, bias, SCALE).flatten(1))
        return x + self.ff(self.ff_norm(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, gated: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.cross_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.cross = CrossAttention(cfg)
        self.ff_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ff = FeedForward(cfg, gated)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, bias: AttentionBias,
                cache: tuple[torch.Tensor, ...], encoded: torch.Tensor | None) -> torch.Tensor:
        cache_k, cache_v, cross_k, cross_v = cache
        q, k, v = self.attn.project(self.attn_norm(x))
        x = x + self.attn.o(cached_attention(q, k, v, cache_k, cache_v, meta, SCALE, bias).flatten(1))
        if encoded is not None:
            self.cross.write(encoded, meta.cross.encoder, cross_k, cross_v)
        x = x + self.cross(self.cross_norm(x), meta, cross_k, cross_v)
        return x + self.ff(self.ff_norm(x))


class T5ForConditionalGeneration(CausalLM):
    """t5 / mt5; q/k/v, the cross-attention's k/v and a gated FFN's wi_0/wi_1 are fused at load."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        raw = cfg.raw
        self.config = cfg
        gated, _ = feed_forward_kind(raw)
        buckets = raw.get("relative_attention_num_buckets", 32)
        distance = raw.get("relative_attention_max_distance", 128)
        self.shared = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.encoder_bias = RelativePositionBias(buckets, cfg.num_heads, distance, bidirectional=True)
        self.encoder_blocks = nn.ModuleList(EncoderBlock(cfg, gated) for _ in range(require(raw, "num_layers")))
        self.encoder_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.decoder_bias = RelativePositionBias(buckets, cfg.num_heads, distance, bidirectional=False)
        self.decoder_blocks = nn.ModuleList(DecoderBlock(cfg, gated) for _ in range(cfg.num_layers))
        self.decoder_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = make_linear(cfg.hidden_size, cfg.vocab_size, False, cfg.quantization)
        # Original T5 scales the decoder output for its tied head; v1.1 and mT5 do not.
        scaled = cfg.model_type == "t5" and raw.get("scale_decoder_outputs", cfg.tie_word_embeddings) is not False
        self.output_scale = cfg.hidden_size**-0.5 if scaled else 1.0
        # Not a submodule (the blocks are registered above): the forward order the offload streams in.
        self.__dict__["_blocks"] = nn.ModuleList([*self.encoder_blocks, *self.decoder_blocks])

    @staticmethod
    def parse_config(raw: dict[str, Any]) -> ModelConfig:
        _, act = feed_forward_kind(raw)
        heads = require(raw, "num_heads")
        start = raw.get("decoder_start_token_id")
        if start is None:
            start = raw.get("pad_token_id") or 0
        return ModelConfig(
            model_type=raw["model_type"],
            vocab_size=require(raw, "vocab_size"),
            hidden_size=require(raw, "d_model"),
            num_layers=raw.get("num_decoder_layers") or require(raw, "num_layers"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=require(raw, "d_kv"),
            intermediate_size=require(raw, "d_ff"),
            # Relative positions set no hard limit; n_positions is what the checkpoint was trained for.
            max_position_embeddings=raw.get("n_positions") or 512,
            norm_eps=raw.get("layer_norm_epsilon", 1e-6),
            hidden_act=act,
            tie_word_embeddings=raw.get("tie_word_embeddings", True) is not False,
            is_encoder_decoder=True,
            decoder_start_token_id=start,
            **common_fields(raw),
        )

    def weight_specs(self, reader: CheckpointReader) -> Iterator[WeightSpec]:
        cfg = self.config
        h, inner, ff = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size
        buckets = self.encoder_bias.num_buckets

        def spec(module: nn.Module, param: str, names: list[str], shapes: list[tuple[int, ...]]) -> WeightSpec:
            return WeightSpec(module, param, tuple(names), tuple(shapes))

        def attention(module: SelfAttention, p: str) -> Iterator[WeightSpec]:
            yield spec(module.qkv, "weight", [f"{p}{n}.weight" for n in "qkv"], [(inner, h)] * 3)
            yield spec(module.o, "weight", [f"{p}o.weight"], [(h, inner)])

        def feed_forward(module: FeedForward, p: str) -> Iterator[WeightSpec]:
            wi = ["wi_0", "wi_1"] if module.gated else ["wi"]
            yield spec(module.wi, "weight", [f"{p}DenseReluDense.{n}.weight" for n in wi], [(ff, h)] * len(wi))
            yield spec(module.wo, "weight", [f"{p}DenseReluDense.wo.weight"], [(h, ff)])

        def norm(module: RMSNorm, name: str) -> WeightSpec:
            return spec(module, "weight", [name], [(h,)])

        yield spec(self.shared, "weight", ["shared.weight"], [(cfg.vocab_size, h)])
        for stack, bias in (("encoder", self.encoder_bias), ("decoder", self.decoder_bias)):
            name = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
            yield spec(bias.embedding, "weight", [name], [(buckets, cfg.num_heads)])
        for i, block in enumerate(self.encoder_blocks):
            p = f"encoder.block.{i}.layer."
            yield from attention(block.attn, f"{p}0.SelfAttention.")
            yield norm(block.attn_norm, f"{p}0.layer_norm.weight")
            yield from feed_forward(block.ff, f"{p}1.")
            yield norm(block.ff_norm, f"{p}1.layer_norm.weight")
        yield norm(self.encoder_norm, "encoder.final_layer_norm.weight")
        for i, block in enumerate(self.decoder_blocks):
            p = f"decoder.block.{i}.layer."
            yield from attention(block.attn, f"{p}0.SelfAttention.")
            yield norm(block.attn_norm, f"{p}0.layer_norm.weight")
            cross = f"{p}1.EncDecAttention."
            yield spec(block.cross.q, "weight", [f"{cross}q.weight"], [(inner, h)])
            yield spec(block.cross.kv, "weight", [f"{cross}k.weight", f"{cross}v.weight"], [(inner, h)] * 2)
            yield spec(block.cross.o, "weight", [f"{cross}o.weight"], [(h, inner)])
            yield norm(block.cross_norm, f"{p}1.layer_norm.weight")
            yield from feed_forward(block.ff, f"{p}2.")
            yield norm(block.ff_norm, f"{p}2.layer_norm.weight")
        yield norm(self.decoder_norm, "decoder.final_layer_norm.weight")

    def blocks(self) -> nn.ModuleList:
        return self._blocks

    def step_start(self) -> int:
        """The first decoder layer: a decode step runs the decoder alone, the encoder only where a step encodes."""
        return len(self.encoder_blocks)

    def input_embeddings(self) -> Embedding:
        return self.shared

    def setup(self, context: int, device: torch.device, dtype: torch.dtype) -> None:
        """Relative positions need no tables."""

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                cache: tuple[list[torch.Tensor], ...]) -> torch.Tensor:
        """Decoder hidden states for the packed decoder tokens, after encoding this step's encoder inputs;
        cache is (k, v, cross_k, cross_v), each per decoder layer [slots, ...]."""
        encoder = meta.cross.encoder
        encoded = None if encoder is None else self.encode(encoder)
        bias = self.decoder_attention_bias(meta)
        x = self.shared(input_ids)
        first = len(self.encoder_blocks)
        for i, block in self.decoder_layers(first):
            x = block(x, meta, bias, tuple(c[i - first] for c in cache), encoded)
        return x

    def encode(self, encoder: EncoderBatch) -> torch.Tensor:
        """The encoder's output [M, hidden] for its packed inputs."""
        longest = max(end - start for start, end in encoder.spans)
        positions = torch.arange(longest, device=encoder.input_ids.device)
        bias = self.encoder_bias(positions, positions).unsqueeze(0)
        x = self.shared(encoder.input_ids)
        for _, block in self.decoder_layers(0, len(self.encoder_blocks)):
            x = block(x, encoder.spans, bias)
        return self.encoder_norm(x)

    def decoder_attention_bias(self, meta: AttentionMetadata) -> AttentionBias:
        """The decoder's position bias for each query of the step, -inf on keys after the query."""
        positions = meta.positions

        def masked(queries: torch.Tensor, kv_len: int) -> torch.Tensor:
            keys = torch.arange(kv_len, device=queries.device)
            bias = self.decoder_bias(queries, keys)
            return bias.masked_fill(keys[None, None, :] > queries[None, :, None], float("-inf"))

        nd = meta.num_decode
        decode = masked(positions[:nd], meta.decode_kv_len).transpose(0, 1) if nd else None
        return AttentionBias(decode, [masked(positions[c.start : c.end], c.kv_len).unsqueeze(0)
                                      for c in meta.prefills])

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder_norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self.final_hidden(hidden)
        if self.output_scale != 1.0:
            hidden = hidden * self.output_scale
        return self.lm_head(hidden)
