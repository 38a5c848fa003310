"""The inference engine: model families, weight loading, KV cache, sampler, scheduler. No HTTP here."""

from typing import TYPE_CHECKING

from vramlite._lazy import lazy_exports

if TYPE_CHECKING:
    from vramlite.engine.engine import Completion, Engine
    from vramlite.engine.sampler import SamplingParams
    from vramlite.engine.sequence import FinishReason, StepOutput

__all__ = ["Completion", "Engine", "FinishReason", "SamplingParams", "StepOutput"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "Completion": "vramlite.engine.engine", "Engine": "vramlite.engine.engine",
    "SamplingParams": "vramlite.engine.sampler",
    "FinishReason": "vramlite.engine.sequence", "StepOutput": "vramlite.engine.sequence",
})
