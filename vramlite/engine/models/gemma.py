"""Gemma decoders: gemma, gemma2, gemma3 (text, and the language model of Gemma 3's multimodal checkpoints).

LLaMA's blocks with Gemma's differences: norms that store their weight as an
offset from 1, embeddings scaled by sqrt(hidden), and the GeLU-tanh MLP. Gemma 2
and 3 wrap attention and the MLP each between two norms and alternate
sliding-window and full layers; Gemma 2 caps attention scores and logits with
tanh; Gemma 3 normalizes each head of q and k and gives its sliding layers a
rope of their own.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vramlite.engine.config import ModelConfig, RopeConfig, parse_rope
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.layers.attention import AttentionMetadata, window_metas
from vramlite.engine.layers.norm import GemmaRMSNorm
from vramlite.engine.layers.rotary import RotaryEmbedding
from vramlite.engine.models.llama import MLP, Attention, LlamaForCausalLM

# transformers' Gemma3TextConfig defaults, which the text_config of Gemma 3's multimodal checkpoints leaves out
GEMMA3_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "hidden_activation": "gelu_pytorch_tanh",
    "bos_token_id": 2, "eos_token_id": 1,
}

SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")


class GemmaDecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None) -> None:
        super().__init__()
        self.window = window  # the layer's sliding window; None: it attends to every position
        self.sandwich = cfg.model_type != "gemma"  # gemma2 and 3 norm each sublayer's input and output
        self.NORMS = SANDWICH_NORMS if self.sandwich else SANDWICH_NORMS[:2]
        for name in self.NORMS:
            setattr(self, name, GemmaRMSNorm(cfg.hidden_size, cfg.norm_eps))
        self.self_attn = Attention(cfg, GemmaRMSNorm)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, meta, cache_k, cache_v)
        if not self.sandwich:  # gemma: LLaMA's order, post_attention_layernorm being the MLP's input norm
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaForCausalLM(LlamaForCausalLM):
    """gemma / gemma2 / gemma3_text / gemma3; the head is the embedding's (Gemma ties them)."""

    decoder_layer = GemmaDecoderLayer
    final_norm = GemmaRMSNorm

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.local_rotary: RotaryEmbedding | None = None

    @staticmethod
    def parse_config(raw: dict[str, Any]) -> ModelConfig:
        if raw["model_type"] == "gemma3":  # multimodal: its language model alone (images are not read)
            top = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "torch_dtype", "dtype") if k in raw}
            raw = {**GEMMA3_TEXT_DEFAULTS, **top, **(raw.get("text_config") or {}), "model_type": "gemma3_text"}
        model_type = raw["model_type"]
        if raw.get("use_bidirectional_attention"):
            raise ModelLoadError("config.json: use_bidirectional_attention (an embedding model) is not supported")
        # Gemma's MLP is GeLU-tanh whatever its first configs said (transformers overrides their "gelu" too).
        act = raw.get("hidden_activation") or "gelu_pytorch_tanh"
        rope_params = raw.get("rope_parameters") or {}
        if "full_attention" in rope_params:  # transformers 5: one rope per layer type
            rope = parse_rope({**raw, "rope_scaling": None, "rope_parameters": rope_params["full_attention"]})
            local = rope_params.get("sliding_attention")
            local_rope = parse_rope({**raw, "rope_scaling": None, "rope_parameters": local}) if local else None
        else:
            rope = parse_rope(raw)
            local_rope = RopeConfig(theta=float(raw.get("rope_local_base_freq", 10000.0))) \
                if model_type == "gemma3_text" else None
        cfg = LlamaForCausalLM.parse_config({**raw, "hidden_act": act, "tie_word_embeddings": True})
        scalar = raw.get("query_pre_attn_scalar")
        return dataclasses.replace(
            cfg,
            qk_norm=model_type == "gemma3_text",
            attention_scale=None if model_type == "gemma" or scalar is None else scalar**-0.5,
            attention_softcap=raw.get("attn_logit_softcapping"),
            logit_softcap=raw.get("final_logit_softcapping"),
            rope=rope,
            local_rope=local_rope,
        )

    def setup(self, context: int, device: torch.device, dtype: torch.dtype) -> None:
        super().setup(context, device, dtype)
        cfg = self.config
        if cfg.local_rope is not None:
            self.local_rotary = RotaryEmbedding(cfg.local_rope, cfg.head_dim, cfg.max_position_embeddings, context,
                                                device, dtype)

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata,
                cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(self.config.hidden_size**0.5, dtype=x.dtype)  # rounded to x's dtype, as trained
        rope = self.rotary.tables(meta.positions)
        local_rope = rope if self.local_rotary is None else self.local_rotary.tables(meta.positions)
        cache_k, cache_v = cache
        windows = window_metas(meta, self.config.layer_windows, cache_k)
        for i, layer in self.decoder_layers():
            layer_rope = rope if layer.window is None else local_rope
            x = layer(x, layer_rope, windows.get(layer.window, meta), cache_k[i], cache_v[i])
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap
