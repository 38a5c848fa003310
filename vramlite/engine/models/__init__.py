"""Model families, chosen by `config.json`'s `model_type`."""

from __future__ import annotations

from vramlite.engine.errors import ModelLoadError
from vramlite.engine.models.base import CausalLM
from vramlite.engine.models.cpmant import CpmAntForCausalLM
from vramlite.engine.models.gemma import GemmaForCausalLM
from vramlite.engine.models.gpt2 import GPT2LMHeadModel
from vramlite.engine.models.llama import LlamaForCausalLM
from vramlite.engine.models.t5 import T5ForConditionalGeneration

FAMILIES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,
    "gemma": GemmaForCausalLM,
    "gemma2": GemmaForCausalLM,
    "gemma3_text": GemmaForCausalLM,
    "gemma3": GemmaForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "t5": T5ForConditionalGeneration,
    "mt5": T5ForConditionalGeneration,
    "cpmant": CpmAntForCausalLM,
}


def family(model_type: str | None) -> type[CausalLM]:
    """The model class for `model_type`, or ModelLoadError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"config.json: model_type {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})"
        )
    return FAMILIES[model_type]
