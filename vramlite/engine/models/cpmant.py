"""CPM-Ant (`cpmant`): the seeds' 10B Chinese decoder, which BMInf served.

What sets it apart from a LLaMA-style decoder:

- each sequence starts with `prompt_length` learned prompt tokens (ids past the vocabulary) that the model
  puts in front of the text; they take the first positions of the slot's cache (`ModelConfig.cache_prefix`);
- the embedding adds a segment embedding: segment 0 for those prompt tokens, 2 for the text;
- one attention bias table, shared by the layers: within a segment, bucketed relative positions (T5's
  bidirectional buckets); across segments, one entry per (query segment, key segment) pair;
- the prompt tokens and the prompt given with them attend to each other both ways, so a prompt is prefilled
  in one piece (`ModelConfig.whole_prompt`); each generated token attends to everything before it.

Pre-RMSNorm blocks, q/k/v/o without biases and scores scaled by 1/sqrt(dim_head), a gated feed-forward
(exact GELU), a final RMSNorm and an LM head of its own over the vocabulary (the checkpoint's
`lm_head.weight`, else the embedding's first `vocab_size` rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vramlite.engine.config import ModelConfig, ModelLoadError, common_fields, require
from vramlite.engine.layers.attention import AttentionBias, AttentionMetadata, PrefillChunk, cached_attention
from vramlite.engine.layers.embedding import Embedding
from vramlite.engine.layers.linear import make_linear
from vramlite.engine.layers.norm import RMSNorm
from vramlite.engine.layers.relative_position import relative_position_bucket
from vramlite.engine.models.base import CausalLM, WeightSpec
from vramlite.engine.weights import CheckpointReader

PROMPT_SEGMENT, TEXT_SEGMENT = 0, 2


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.inner = cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        width = cfg.num_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.qkv = make_linear(cfg.hidden_size, 3 * width, False, cfg.quantization)
        self.o = make_linear(width, cfg.hidden_size, False, cfg.quantization)
        self.ff_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.w_in = make_linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, cfg.quantization)  # w_0, w_1
        self.w_out = make_linear(cfg.intermediate_size, cfg.hidden_size, False, cfg.quantization)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, bias: AttentionBias, cache_k: torch.Tensor,
                cache_v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.attn_norm(x)).view(-1, 3 * self.num_heads, self.head_dim).split(self.num_heads, 1)
        x = x + self.o(cached_attention(q, k, v, cache_k, cache_v, meta, bias=bias).flatten(1))
        gate, linear = self.w_in(self.ff_norm(x)).split(self.inner, dim=-1)
        return x + self.w_out(F.gelu(gate) * linear)


class SegmentPositionBias(nn.Module):
    """The bias [heads, queries, keys] between cache positions: positions before `prefix` are the prompt
    tokens' segment, the rest the text's."""

    def __init__(self, cfg: ModelConfig, num_buckets: int, max_distance: int, segment_types: int,
                 prefix: int) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.segment_types, self.prefix = (num_buckets, max_distance,
                                                                                segment_types, prefix)
        self.table = Embedding(segment_types * segment_types + num_buckets, cfg.num_heads)

    def segments(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.where(positions < self.prefix, PROMPT_SEGMENT, TEXT_SEGMENT)

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        q_seg, k_seg = self.segments(query_positions)[:, None], self.segments(key_positions)[None, :]
        within = relative_position_bucket(key_positions[None, :] - query_positions[:, None], True,
                                          self.num_buckets, self.max_distance)
        across = self.num_buckets + q_seg * self.segment_types + k_seg
        return self.table(torch.where(q_seg == k_seg, within, across)).permute(2, 0, 1)


class CpmAntForCausalLM(CausalLM):
    """cpmant; a block's project_q/k/v and w_0/w_1 are fused at load."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        raw = cfg.raw
        self.config = cfg
        self.prompt_length = cfg.cache_prefix
        prompt_rows = raw.get("prompt_types", 32) * self.prompt_length
        self.input_embedding = Embedding(cfg.vocab_size + prompt_rows, cfg.hidden_size)
        self.segment_types = raw.get("segment_types", 32)
        self.segment_embedding = Embedding(self.segment_types, cfg.hidden_size)
        self.position_bias = SegmentPositionBias(cfg, raw.get("position_bias_num_buckets", 512),
                                                 raw.get("position_bias_max_distance", 2048), self.segment_types,
                                                 self.prompt_length)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.output_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = make_linear(cfg.hidden_size, cfg.vocab_size, False, cfg.quantization)
        self.prompt_ids: torch.Tensor | None = None

    @staticmethod
    def parse_config(raw: dict[str, Any]) -> ModelConfig:
        heads = require(raw, "num_attention_heads")
        if raw.get("segment_types", 32) <= TEXT_SEGMENT:
            raise ModelLoadError(f"config.json: segment_types {raw['segment_types']} leaves no room for the text's "
                                 f"segment {TEXT_SEGMENT}: CPM-Ant needs at least {TEXT_SEGMENT + 1}")
        return ModelConfig(
            model_type="cpmant",
            vocab_size=require(raw, "vocab_size"),
            hidden_size=require(raw, "hidden_size"),
            num_layers=require(raw, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=require(raw, "dim_head"),
            intermediate_size=require(raw, "dim_ff"),
            # Relative positions set no hard limit: the bias saturates at its max distance.
            max_position_embeddings=raw.get("position_bias_max_distance", 2048),
            norm_eps=raw.get("eps", 1e-6),
            hidden_act="gelu",
            tie_word_embeddings=False,  # the head is its own tensor (a tie would be the vocabulary rows)
            whole_prompt=True,
            cache_prefix=raw.get("prompt_length", 32),
            **common_fields(raw),
        )

    def weight_specs(self, reader: CheckpointReader) -> Iterator[WeightSpec]:
        cfg = self.config
        h, width, ff = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size

        def spec(module: nn.Module, param: str, names: list[str], shapes: list[tuple[int, ...]]) -> WeightSpec:
            return WeightSpec(module, param, tuple("cpmant." + n for n in names), tuple(shapes))

        yield spec(self.input_embedding, "weight", ["input_embedding.weight"],
                   [tuple(self.input_embedding.weight.shape)])
        yield spec(self.segment_embedding, "weight", ["segment_embedding.weight"], [(self.segment_types, h)])
        yield spec(self.position_bias.table, "weight", ["position_bias.relative_attention_bias"],
                   [tuple(self.position_bias.table.weight.shape)])
        for i, block in enumerate(self.layers):
            att, ffn = f"encoder.layers.{i}.self_att.", f"encoder.layers.{i}.ffn."
            yield spec(block.attn_norm, "weight", [f"{att}layernorm_before_attention.weight"], [(h,)])
            yield spec(block.qkv, "weight", [f"{att}self_attention.project_{n}.weight" for n in "qkv"],
                       [(width, h)] * 3)
            yield spec(block.o, "weight", [f"{att}self_attention.attention_out.weight"], [(h, width)])
            yield spec(block.ff_norm, "weight", [f"{ffn}layernorm_before_ffn.weight"], [(h,)])
            yield spec(block.w_in, "weight", [f"{ffn}ffn.w_in.w_{n}.weight" for n in "01"], [(ff, h)] * 2)
            yield spec(block.w_out, "weight", [f"{ffn}ffn.w_out.weight"], [(h, ff)])
        yield spec(self.output_layernorm, "weight", ["encoder.output_layernorm.weight"], [(h,)])

    def blocks(self) -> nn.ModuleList:
        return self.layers

    def input_embeddings(self) -> Embedding:
        return self.input_embedding

    def setup(self, context: int, device: torch.device, dtype: torch.dtype) -> None:
        """The ids of the prompt tokens every sequence starts with, as transformers' CpmAntModel numbers them."""
        first = self.config.vocab_size + 2 * self.prompt_length
        self.prompt_ids = torch.arange(first, first + self.prompt_length, device=device)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        ids, meta, rows = self.with_prompt_tokens(input_ids, meta)
        segments = self.position_bias.segments(meta.positions)
        x = self.input_embedding(ids) + self.segment_embedding(segments)
        bias = self.attention_bias(meta)
        cache_k, cache_v = cache
        for i, layer in self.decoder_layers():
            x = layer(x, meta, bias, cache_k[i], cache_v[i])
        return x[rows]

    def with_prompt_tokens(self, input_ids: torch.Tensor, meta: AttentionMetadata
                           ) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
        """The step's tokens with the prompt tokens in front of each prompt, at cache positions shifted past
        them; returns the ids, their metadata and the rows that are the caller's tokens."""
        p, nd, device = self.prompt_length, meta.num_decode, input_ids.device
        ids, positions, slots = [input_ids[:nd]], [meta.positions[:nd] + p], [meta.write_slots[:nd]]
        rows, prefills, begin = [torch.arange(nd, device=device)], [], nd
        for chunk in meta.prefills:
            n = chunk.end - chunk.start
            if chunk.kv_len != n:
                raise ValueError("a CPM-Ant prompt is prefilled in one piece (its tokens attend both ways)")
            ids += [self.prompt_ids, input_ids[chunk.start : chunk.end]]
            positions.append(torch.arange(p + n, device=device))
            slots.append(meta.write_slots[chunk.start : chunk.end][:1].expand(p + n))
            rows.append(torch.arange(begin + p, begin + p + n, device=device))
            prefills.append(PrefillChunk(begin, begin + p + n, chunk.slot, p + n, None))
            begin += p + n
        # No decode mask: the attention bias masks each decode token's keys past its own position.
        shifted = AttentionMetadata(torch.cat(positions), torch.cat(slots), nd, meta.decode_slots,
                                    meta.decode_kv_len + p if nd else 0, None, prefills)
        return torch.cat(ids), shifted, torch.cat(rows)

    def attention_bias(self, meta: AttentionMetadata) -> AttentionBias:
        """Each decode token's bias over its cache, -inf past its own position (batched slots differ in
        length); each prompt's bias over itself, both ways."""
        decode = None
        if meta.num_decode:
            queries = meta.positions[: meta.num_decode]
            keys = torch.arange(meta.decode_kv_len, device=queries.device)
            decode = self.position_bias(queries, keys).transpose(0, 1)
            decode = decode.masked_fill(keys[None, None, :] > queries[:, None, None], float("-inf"))
        prefills = [self.position_bias(positions, positions).unsqueeze(0)
                    for positions in (meta.positions[c.start : c.end] for c in meta.prefills)]
        return AttentionBias(decode, prefills)

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output_layernorm(hidden)
