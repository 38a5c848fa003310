"""Kernels for vramlite: W8A16 (decode) and W8A8 (prefill) int8 linear layers in Triton, per-channel weight and
per-token activation quantization, and decode attention over a slot-indexed KV cache, dispatched by the GPU's
compute capability (torch references on CPU).

One module per op (`quant`, `w8a16`, `w8a8`, `attention`), each with its Triton kernel, launcher and torch
reference; `dispatch` picks among them. Importing does no compiling and works without triton.

A subpackage, not a top-level `kernels`: transformers (5.25 and later depend on it) imports Hugging Face's
hub `kernels` package by that name, and would take a `kernels` of ours first on sys.path for theirs
(tests/kernels/test_import_hazard.py).
"""

from ._common import Backend
from .dispatch import (
    W8A16_MAX_M,
    backend_for,
    decode_attention,
    int8_linear,
    quantize_activation_per_token,
    w8a8_linear,
    w8a16_linear,
)
from .quant import dequantize_weight, quantize_weight
from .w8a8 import w8a8_linear_with

__all__ = [
    "W8A16_MAX_M",
    "Backend",
    "backend_for",
    "decode_attention",
    "dequantize_weight",
    "int8_linear",
    "quantize_activation_per_token",
    "quantize_weight",
    "w8a8_linear",
    "w8a8_linear_with",
    "w8a16_linear",
]
