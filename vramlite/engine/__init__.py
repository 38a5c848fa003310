"""The inference engine: model families, weight loading, KV cache, sampler, scheduler. No HTTP here."""

from typing import TYPE_CHECKING

from vramlite._lazy import lazy_exports

if TYPE_CHECKING:
    from vramlite.engine.engine import Completion, Engine
    from vramlite.engine.sampler import SamplingParams
    from vramlite.engine.sequence import FinishReason, Logprobs, StepOutput, TokenLogprob

__all__ = ["Completion", "Engine", "FinishReason", "Logprobs", "SamplingParams", "StepOutput", "TokenLogprob"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "Completion": "vramlite.engine.engine", "Engine": "vramlite.engine.engine",
    "SamplingParams": "vramlite.engine.sampler",
    **dict.fromkeys(("FinishReason", "Logprobs", "StepOutput", "TokenLogprob"), "vramlite.engine.sequence"),
})
