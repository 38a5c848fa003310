"""LLaMA-style decoders: llama, mistral, qwen2 (GQA, RoPE with scaling, optional qkv bias)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig, eos_ids, parse_rope, require
from engine.errors import ModelLoadError
from engine.layers.attention import AttentionMetadata, cached_attention
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.models.base import CausalLM, assign
from engine.weights import CheckpointReader

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        # q and k rotate together: one set of elementwise ops per layer instead of two.
        qk = apply_rotary(qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads,
                                                                     self.head_dim), *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        o = cached_attention(q, k, v, cache_k, cache_v, meta)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, cache_k, cache_v)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    """llama / mistral / qwen2; parameter names follow the HF checkpoint, with q/k/v and gate/up fused."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary: RotaryEmbedding | None = None

    @staticmethod
    def parse_config(raw: dict[str, Any]) -> ModelConfig:
        hidden = require(raw, "hidden_size")
        heads = require(raw, "num_attention_heads")
        model_type = raw["model_type"]
        attention_bias = bool(raw.get("attention_bias", False))
        act = raw.get("hidden_act", "silu")
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"config.json: hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        sliding = raw.get("sliding_window") if raw.get("use_sliding_window", model_type == "mistral") else None
        return ModelConfig(
            model_type=model_type,
            vocab_size=require(raw, "vocab_size"),
            hidden_size=hidden,
            num_layers=require(raw, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            intermediate_size=require(raw, "intermediate_size"),
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            norm_eps=raw.get("rms_norm_eps", 1e-6),
            hidden_act=act,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            sliding_window=sliding,
            rope=parse_rope(raw),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids(raw.get("eos_token_id")),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            raw=raw,
        )

    def load_weights(self, reader: CheckpointReader, device: torch.device, dtype: torch.dtype) -> None:
        cfg = self.config
        h, hd = cfg.hidden_size, cfg.head_dim
        q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
        prefix = "model." if "model.embed_tokens.weight" in reader else ""

        def get(name: str, *shape: int) -> torch.Tensor:
            return reader.get(prefix + name, shape)

        assign(self.embed_tokens, "weight", get("embed_tokens.weight", cfg.vocab_size, h), device, dtype)
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            qkv_shapes = {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out}
            weight = torch.cat([get(f"{p}self_attn.{n}.weight", o, h) for n, o in qkv_shapes.items()])
            assign(attn.qkv_proj, "weight", weight, device, dtype)
            if cfg.qkv_bias:
                bias = torch.cat([get(f"{p}self_attn.{n}.bias", o) for n, o in qkv_shapes.items()])
                assign(attn.qkv_proj, "bias", bias, device, dtype)
            assign(attn.o_proj, "weight", get(f"{p}self_attn.o_proj.weight", h, q_out), device, dtype)
            if cfg.o_bias:
                assign(attn.o_proj, "bias", get(f"{p}self_attn.o_proj.bias", h), device, dtype)
            inter = cfg.intermediate_size
            gate_up = torch.cat([get(f"{p}mlp.{n}.weight", inter, h) for n in ("gate_proj", "up_proj")])
            assign(mlp.gate_up_proj, "weight", gate_up, device, dtype)
            assign(mlp.down_proj, "weight", get(f"{p}mlp.down_proj.weight", h, inter), device, dtype)
            if cfg.mlp_bias:
                bias = torch.cat([get(f"{p}mlp.{n}.bias", inter) for n in ("gate_proj", "up_proj")])
                assign(mlp.gate_up_proj, "bias", bias, device, dtype)
                assign(mlp.down_proj, "bias", get(f"{p}mlp.down_proj.bias", h), device, dtype)
            for norm in ("input_layernorm", "post_attention_layernorm"):
                assign(getattr(layer, norm), "weight", get(f"{p}{norm}.weight", h), device, dtype)
        assign(self.norm, "weight", get("norm.weight", h), device, dtype)
        if cfg.tie_word_embeddings or "lm_head.weight" not in reader:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            assign(self.lm_head, "weight", reader.get("lm_head.weight", (cfg.vocab_size, h)), device, dtype)

    def setup(self, context: int, device: torch.device, dtype: torch.dtype) -> None:
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, context, device, dtype)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.tables(meta.positions)
        cache_k, cache_v = cache
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, meta, cache_k[i], cache_v[i])
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))
