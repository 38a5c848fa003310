"""The inference engine: model families, weight loading, KV cache, sampler, scheduler. No HTTP here."""

from vramlite.engine.engine import Completion, Engine
from vramlite.engine.sampler import SamplingParams
from vramlite.engine.sequence import FinishReason, StepOutput

__all__ = ["Completion", "Engine", "FinishReason", "SamplingParams", "StepOutput"]
