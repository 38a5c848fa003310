"""LLaMA-style decoders: llama, mistral, qwen2, qwen3, phi3 (GQA, RoPE with scaling, optional qkv bias, optional
per-head q/k RMSNorm)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vramlite.engine.config import ModelConfig, common_fields, parse_rope, require
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.layers.embedding import Embedding
from vramlite.engine.layers.attention import AttentionMetadata, cached_attention, window_metas
from vramlite.engine.layers.linear import make_linear
from vramlite.engine.layers.norm import RMSNorm
from vramlite.engine.layers.rotary import RotaryEmbedding, apply_rotary
from vramlite.engine.models.base import CausalLM, WeightSpec
from vramlite.engine.weights import CheckpointReader

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def layer_windows(raw: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window from config.json: transformers 5's `layer_types`, else the older keys
    (mistral and phi3 slide in every layer; qwen2 and qwen3, when `use_sliding_window`, from `max_window_layers`
    on; gemma2 in every other layer, gemma3 in all but every `sliding_window_pattern`-th)."""
    model_type, layers = raw["model_type"], require(raw, "num_hidden_layers")
    window = raw.get("sliding_window")
    if not window or not raw.get("use_sliding_window", model_type in ("mistral", "phi3", "gemma2", "gemma3_text")):
        return ()
    types = raw.get("layer_types")
    if types is not None:
        sliding = [t == "sliding_attention" for t in types]
    elif model_type in ("gemma2", "gemma3_text"):
        pattern = raw.get("sliding_window_pattern", 2 if model_type == "gemma2" else 6)
        sliding = [(i + 1) % pattern != 0 for i in range(layers)]
    else:
        sliding = [model_type not in ("qwen2", "qwen3") or i >= raw.get("max_window_layers", 0) for i in range(layers)]
    return tuple(window if s else None for s in sliding) if any(sliding) else ()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, norm: type[nn.Module] = RMSNorm) -> None:
        super().__init__()
        self.scale, self.softcap = cfg.attention_scale, cfg.attention_softcap
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = make_linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias, cfg.quantization)
        self.o_proj = make_linear(self.q_size, cfg.hidden_size, cfg.o_bias, cfg.quantization)
        if cfg.qk_norm:
            self.q_norm = norm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = norm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # q and k rotate together: one set of elementwise ops per layer instead of two.
        qk = apply_rotary(qk, *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        o = cached_attention(q, k, v, cache_k, cache_v, meta, self.scale, softcap=self.softcap)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias, cfg.quantization)
        self.down_proj = make_linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, cfg.quantization)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    NORMS = ("input_layernorm", "post_attention_layernorm")  # its norms' checkpoint names

    def __init__(self, cfg: ModelConfig, window: int | None) -> None:
        super().__init__()
        self.window = window  # the layer's sliding window; None: it attends to every position
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, meta, cache_k, cache_v)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(CausalLM):
    """llama / mistral / qwen2 / qwen3 / phi3; parameter names follow the HF checkpoint, with q/k/v and gate/up
    fused (as phi3 checkpoints store them)."""

    decoder_layer: type[nn.Module] = DecoderLayer
    final_norm: type[nn.Module] = RMSNorm

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        windows = cfg.layer_windows or (None,) * cfg.num_layers
        self.layers = nn.ModuleList(self.decoder_layer(cfg, window) for window in windows)
        self.norm = self.final_norm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = make_linear(cfg.hidden_size, cfg.vocab_size, False, cfg.quantization)
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
            qk_norm=model_type == "qwen3",
            layer_windows=layer_windows(raw),
            rope=parse_rope(raw),
            **common_fields(raw),
        )

    def weight_specs(self, reader: CheckpointReader) -> Iterator[WeightSpec]:
        cfg = self.config
        h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
        # a causal LM's "model.", none for a bare decoder, a multimodal checkpoint's language model (gemma3)
        prefix = next((p for p in ("model.", "language_model.model.", "model.language_model.")
                       if f"{p}embed_tokens.weight" in reader), "")
        fused = cfg.model_type == "phi3"

        def spec(module: nn.Module, param: str, names: list[str], shapes: list[tuple[int, ...]]) -> WeightSpec:
            return WeightSpec(module, param, tuple(prefix + n for n in names), tuple(shapes))

        yield spec(self.embed_tokens, "weight", ["embed_tokens.weight"], [(cfg.vocab_size, h)])
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            if fused:
                qkv, qkv_rows = [f"{p}self_attn.qkv_proj."], [q_out + 2 * kv_out]
                gate_up, gate_up_rows = [f"{p}mlp.gate_up_proj."], [2 * inter]
            else:
                qkv, qkv_rows = [f"{p}self_attn.{n}_proj." for n in "qkv"], [q_out, kv_out, kv_out]
                gate_up, gate_up_rows = [f"{p}mlp.gate_proj.", f"{p}mlp.up_proj."], [inter, inter]
            yield spec(attn.qkv_proj, "weight", [n + "weight" for n in qkv], [(r, h) for r in qkv_rows])
            yield spec(attn.o_proj, "weight", [f"{p}self_attn.o_proj.weight"], [(h, q_out)])
            yield spec(mlp.gate_up_proj, "weight", [n + "weight" for n in gate_up], [(r, h) for r in gate_up_rows])
            yield spec(mlp.down_proj, "weight", [f"{p}mlp.down_proj.weight"], [(h, inter)])
            if cfg.qkv_bias:
                yield spec(attn.qkv_proj, "bias", [n + "bias" for n in qkv], [(r,) for r in qkv_rows])
            if cfg.o_bias:
                yield spec(attn.o_proj, "bias", [f"{p}self_attn.o_proj.bias"], [(h,)])
            if cfg.mlp_bias:
                yield spec(mlp.gate_up_proj, "bias", [n + "bias" for n in gate_up], [(r,) for r in gate_up_rows])
                yield spec(mlp.down_proj, "bias", [f"{p}mlp.down_proj.bias"], [(h,)])
            for norm in layer.NORMS:
                yield spec(getattr(layer, norm), "weight", [f"{p}{norm}.weight"], [(h,)])
            if cfg.qk_norm:
                for norm in ("q_norm", "k_norm"):
                    yield spec(getattr(attn, norm), "weight", [f"{p}self_attn.{norm}.weight"], [(hd,)])
        yield spec(self.norm, "weight", ["norm.weight"], [(h,)])

    def blocks(self) -> nn.ModuleList:
        return self.layers

    def input_embeddings(self) -> Embedding:
        return self.embed_tokens

    def setup(self, context: int, device: torch.device, dtype: torch.dtype) -> None:
        cfg = self.config
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, context, device, dtype)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.tables(meta.positions)
        cache_k, cache_v = cache
        windows = window_metas(meta, self.config.layer_windows, cache_k)
        for i, layer in self.decoder_layers():
            x = layer(x, rope, windows.get(layer.window, meta), cache_k[i], cache_v[i])
        return x

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)
