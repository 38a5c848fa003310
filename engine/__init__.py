"""The inference engine: model families, weight loading, KV cache, sampler, scheduler. No HTTP here."""

from engine.engine import Completion, Engine
from engine.sampler import SamplingParams
from engine.sequence import FinishReason, StepOutput

__all__ = ["Completion", "Engine", "FinishReason", "SamplingParams", "StepOutput"]
