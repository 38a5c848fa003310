"""One generation request as the engine tracks it: tokens, cache slot, text produced, why it ended."""

from __future__ import annotations

import enum
from collections.abc import Sequence as Seq
from dataclasses import dataclass, replace

from vramlite.engine.detokenizer import IncrementalDetokenizer
from vramlite.engine.pooling import Pooler
from vramlite.engine.sampler import SamplerState, SamplingParams, TokenScores
from vramlite.engine.speculative import NgramIndex
from vramlite.engine.stop import StopMatcher


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop string or stop token matched
    LENGTH = "length"  # max_tokens reached, or the context is full
    EOS = "eos"  # the model ended the text
    CANCELLED = "cancelled"  # aborted by the caller
    ERROR = "error"  # the forward pass failed for this sequence (`StepOutput.error` says how)


@dataclass(frozen=True)
class TokenLogprob:
    """A token, the text it brings out (`IncrementalDetokenizer.candidate_texts`, `detokenizer.texts_at`) and its
    log-probability."""

    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class Logprobs:
    """A token's log-probability and the most likely tokens' at its place (as many as `SamplingParams.logprobs`
    or `prompt_logprobs` asks, best first)."""

    chosen: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class StepOutput:
    """What one step produced for one sequence: a token (if sampled) and the text now safe to show."""

    seq_id: int
    token_id: int | None
    text: str
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: Logprobs | None = None  # when the request asked for them
    # with the first output once the prompt is in the cache, when the request asked: None for its first token
    prompt_logprobs: tuple[Logprobs | None, ...] | None = None
    embedding: list[float] | None = None  # an embedding request's, with its only output
    stop_string: str | None = None  # the stop string that ended the sequence, if one did
    cached_tokens: int | None = None  # with the first output: prompt tokens whose K/V the prefix cache held

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stop_reason(self) -> str | int | None:
        """What stopped the sequence, as vLLM reports it: the stop string, or the stop token (not EOS)."""
        if self.finish_reason is not FinishReason.STOP:
            return None
        return self.stop_string if self.stop_string is not None else self.token_id


class Sequence:
    """Token ids (prompt then output), how many are in the KV cache, and the output-side state.

    For an encoder-decoder model the caller's prompt is `encoder_ids` (encoded
    once, at the sequence's first step) and `prompt_ids` the decoder's start.
    """

    def __init__(self, seq_id: int, prompt_ids: Seq[int], params: SamplingParams, sampler: SamplerState,
                 detokenizer: IncrementalDetokenizer, eos_ids: Seq[int], encoder_ids: Seq[int] = (),
                 whole_prompt: bool = False) -> None:
        self.seq_id = seq_id
        self.whole_prompt = whole_prompt  # prefill the prompt in one piece (its tokens attend both ways)
        # its keys and values at position p depend on tokens 0..p alone: another prompt with the same first
        # tokens may reuse them (not so for an encoder-decoder's decoder, nor a prompt read both ways)
        self.caches_prefix = not encoder_ids and not whole_prompt
        self.params = params
        self.token_ids = list(prompt_ids)
        self.encoder_ids = list(encoder_ids)
        self.encoded = not self.encoder_ids
        self.num_prompt_tokens = len(self.encoder_ids or self.token_ids)  # the prompt as the caller gave it
        self._output_start = len(prompt_ids)
        self.num_computed = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.slot: int | None = None
        self.sampler = sampler
        self.detokenizer = detokenizer
        self.stop = StopMatcher(params.stop, keep=params.include_stop_str_in_output)
        self.eos_ids = frozenset(() if params.ignore_eos else eos_ids)
        self.stop_ids = frozenset(params.stop_token_ids)
        self.text = ""
        self.logprobs: list[Logprobs] = []  # one per generated token, when params.logprobs is set
        self.prompt_logprobs: list[Logprobs | None] = [None]  # the prompt's, as prefill computes them
        self.finish_reason: FinishReason | None = None
        self.lookup: NgramIndex | None = None  # speculative decoding's drafts, for a request that may take them
        self.draft: list[int] = []  # this step's drafted tokens, after the pending one
        self.pooler = None if params.pooling is None else Pooler(params.pooling, len(prompt_ids))

    @property
    def runs_without_output(self) -> bool:
        """Whether the prompt runs though nothing is to be generated: its log-probabilities or its embedding."""
        return self.params.prompt_logprobs is not None or self.pooler is not None

    @property
    def needs_every_prompt_token(self) -> bool:
        """Whether every prompt token must be computed here, none left to another sequence's cached keys and
        values: for their log-probabilities, or an embedding pooled over them."""
        return self.params.prompt_logprobs is not None or (self.pooler is not None and self.pooler.needs_every_token)

    def next_tokens(self, n: int) -> list[int]:
        """The `n` tokens a step computes: pending ones first (the prompt's rest, or the last sampled), then
        drafted ones."""
        pending = self.token_ids[self.num_computed : self.num_computed + n]
        return pending + self.draft[: n - len(pending)]

    @property
    def prompt_length(self) -> int:
        """The prompt's ids in `token_ids` (the decoder's, for an encoder-decoder model)."""
        return self._output_start

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self._output_start :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self._output_start

    @property
    def num_encoder_pending(self) -> int:
        """Encoder tokens still to run (all of them, once, for an encoder-decoder prompt; else 0)."""
        return 0 if self.encoded else len(self.encoder_ids)

    @property
    def num_pending(self) -> int:
        """Tokens not yet in the KV cache: the prompt's rest while prefilling, 1 while decoding."""
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, context: int, scores: TokenScores | None = None) -> StepOutput:
        """Add a sampled token, with its `scores` when the request asked for log-probabilities; decide whether
        the sequence is done and what text to release."""
        if scores is None:
            return self._append(token_id, context)
        texts = self.detokenizer.candidate_texts([token_id, *(t for t, _ in scores.top)])
        top = tuple(TokenLogprob(t, text, lp) for (t, lp), text in zip(scores.top, texts[1:], strict=True))
        logprobs = Logprobs(TokenLogprob(token_id, texts[0], scores.logprob), top)
        self.logprobs.append(logprobs)
        return replace(self._append(token_id, context), logprobs=logprobs)

    def _append(self, token_id: int, context: int) -> StepOutput:
        self.token_ids.append(token_id)
        self.sampler.append(token_id)
        if token_id in self.eos_ids:
            return self.finish(FinishReason.EOS, token_id)
        if token_id in self.stop_ids:
            return self.finish(FinishReason.STOP, token_id)
        text = self.detokenizer.add(token_id)
        if self.num_output_tokens > self.params.min_tokens:
            text, stopped = self.stop.feed(text)
        else:  # stop strings are matched in the text of the tokens after the first min_tokens
            stopped = False
        self.text += text
        if stopped:
            return self.finish(FinishReason.STOP, token_id, text)
        if self.num_output_tokens >= self.params.max_tokens or len(self.token_ids) >= context:
            return self.finish(FinishReason.LENGTH, token_id, text)
        return StepOutput(self.seq_id, token_id, text)

    def finish(self, reason: FinishReason, token_id: int | None = None, text: str = "") -> StepOutput:
        """End the sequence, releasing any text held back for a possible stop string (unless one hit)."""
        if not self.stop.stopped:
            held, stopped = self.stop.feed(self.detokenizer.flush())
            tail = held if stopped else held + self.stop.flush()
            self.text += tail
            text += tail
        self.finish_reason = reason
        return StepOutput(self.seq_id, token_id, text, reason, stop_string=self.stop.matched)
