"""Perplexity of texts under a loaded engine: how well the model, as loaded (dtype, int8, offload), predicts
them. Scores prompts through the scheduler (`SamplingParams.prompt_logprobs`), so texts run batched."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from vramlite.engine.engine import Engine
from vramlite.engine.sampler import SamplingParams


@dataclass(frozen=True)
class Perplexity:
    """The negative log-likelihood of the scored tokens, their count, and the seconds it took."""

    nll: float
    tokens: int
    seconds: float

    @property
    def value(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """`ids` cut into consecutive windows of at most `size` tokens, each scored on its own: every token but
    a window's first is predicted from the window's tokens before it."""
    return [list(ids[i : i + size]) for i in range(0, len(ids), size) if len(ids[i : i + size]) > 1]


def perplexity(engine: Engine, texts: Sequence[str]) -> Perplexity:
    """exp(mean negative log-likelihood) over every token of `texts` but the first of each window: each text
    is tokenized as a prompt (BOS included when the model adds one) and cut into windows of the context less
    one token."""
    if engine.config.is_encoder_decoder or engine.config.whole_prompt:
        raise ValueError("perplexity needs a model that reads its text left to right (an encoder's input, or "
                         "CPM-Ant's prompt, is read both ways)")
    chunks = [w for text in texts for w in windows(engine.encode(text), engine.context - 1)]
    start = time.perf_counter()
    done = engine.generate_batch(chunks, SamplingParams(max_tokens=0, prompt_logprobs=0))
    seconds = time.perf_counter() - start
    scored = [lp.chosen.logprob for c in done for lp in c.prompt_logprobs[1:]]
    return Perplexity(-sum(scored), len(scored), seconds)
