"""GPT-2: learned absolute positions, LayerNorm, fused c_attn stored as Conv1D ([in, out])."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vramlite.engine.config import ModelConfig, common_fields, require
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.layers.embedding import Embedding
from vramlite.engine.layers.attention import AttentionMetadata, cached_attention
from vramlite.engine.layers.linear import make_linear
from vramlite.engine.models.base import CausalLM, WeightSpec
from vramlite.engine.weights import CheckpointReader

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.ln_1 = nn.LayerNorm(h, eps=cfg.norm_eps)
        self.c_attn = make_linear(h, 3 * h, True, cfg.quantization)
        self.attn_proj = make_linear(h, h, True, cfg.quantization)
        self.ln_2 = nn.LayerNorm(h, eps=cfg.norm_eps)
        self.c_fc = make_linear(h, cfg.intermediate_size, True, cfg.quantization)
        self.mlp_proj = make_linear(cfg.intermediate_size, h, True, cfg.quantization)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache_k: torch.Tensor,
                cache_v: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.c_attn(self.ln_1(x)).chunk(3, dim=-1))
        x = x + self.attn_proj(cached_attention(q, k, v, cache_k, cache_v, meta).flatten(1))
        return x + self.mlp_proj(self.act(self.c_fc(self.ln_2(x))))


class GPT2LMHeadModel(CausalLM):
    """gpt2; HF's Conv1D weights are transposed to [out, in] at load."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = make_linear(cfg.hidden_size, cfg.vocab_size, False, cfg.quantization)

    @staticmethod
    def parse_config(raw: dict[str, Any]) -> ModelConfig:
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if raw.get(flag):
                raise ModelLoadError(f"config.json: gpt2 with {flag}=true is not supported")
        if raw.get("scale_attn_weights") is False:
            raise ModelLoadError("config.json: gpt2 with scale_attn_weights=false is not supported")
        hidden = require(raw, "n_embd", "hidden_size")
        heads = require(raw, "n_head", "num_attention_heads")
        act = raw.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"config.json: activation_function {act!r} is not supported "
                                 f"({', '.join(ACTIVATIONS)})")
        return ModelConfig(
            model_type="gpt2",
            vocab_size=require(raw, "vocab_size"),
            hidden_size=hidden,
            num_layers=require(raw, "n_layer", "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            intermediate_size=raw.get("n_inner") or 4 * hidden,
            max_position_embeddings=require(raw, "n_positions", "max_position_embeddings"),
            norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            hidden_act=act,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            **common_fields(raw),
        )

    def weight_specs(self, reader: CheckpointReader) -> Iterator[WeightSpec]:
        cfg = self.config
        h, inner = cfg.hidden_size, cfg.intermediate_size
        prefix = "transformer." if "transformer.wte.weight" in reader else ""

        def spec(module: nn.Module, param: str, name: str, *shape: int, conv1d: bool = False) -> WeightSpec:
            return WeightSpec(module, param, (prefix + name,), (shape,), transposed=conv1d)

        yield spec(self.wte, "weight", "wte.weight", cfg.vocab_size, h)
        yield spec(self.wpe, "weight", "wpe.weight", cfg.max_position_embeddings, h)
        for i, block in enumerate(self.h):
            p = f"h.{i}."
            for ln in ("ln_1", "ln_2"):
                yield spec(getattr(block, ln), "weight", f"{p}{ln}.weight", h)
                yield spec(getattr(block, ln), "bias", f"{p}{ln}.bias", h)
            linears = ((block.c_attn, "attn.c_attn", h, 3 * h), (block.attn_proj, "attn.c_proj", h, h),
                       (block.c_fc, "mlp.c_fc", h, inner), (block.mlp_proj, "mlp.c_proj", inner, h))
            for module, name, fan_in, fan_out in linears:
                yield spec(module, "weight", f"{p}{name}.weight", fan_in, fan_out, conv1d=True)
                yield spec(module, "bias", f"{p}{name}.bias", fan_out)
        yield spec(self.ln_f, "weight", "ln_f.weight", h)
        yield spec(self.ln_f, "bias", "ln_f.bias", h)

    def blocks(self) -> nn.ModuleList:
        return self.h

    def input_embeddings(self) -> Embedding:
        return self.wte

    def setup(self, context: int, device: torch.device, dtype: torch.dtype) -> None:
        """Learned positions need no tables."""

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(meta.positions)
        cache_k, cache_v = cache
        for i, block in self.decoder_layers():
            x = block(x, meta, cache_k[i], cache_v[i])
        return x

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ln_f(hidden)
