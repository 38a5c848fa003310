"""Speculative decoding by prompt lookup: draft tokens without a draft model, verify them in one forward pass.

Where a sequence's last n tokens (n from `MAX_NGRAM` down to `MIN_NGRAM`) occurred
before, in its prompt or its output, the tokens that followed them then are a
draft of what comes next (vLLM's "ngram" method, llama.cpp's lookup decoding).
The engine runs the last token and the draft as one chunk, whose logits give
the request's distribution at each position. A greedy request keeps the draft
up to its first miss, plus the model's own token after it; a sampled one keeps
each drafted token with the probability its position gives it, else draws that
position's token from the rest (speculative sampling: the tokens follow the
distribution of one-at-a-time sampling, though a seed gives other tokens than
without drafts). A step thus yields 1 to k + 1
tokens for little more than the cost of one, where a decode step costs a pass
over the weights: above all when layers are streamed over PCIe, each pass
carrying every streamed byte. Code, quotes, edits and extraction repeat their
context and accept most drafts; free prose accepts few, and costs a few
tokens more compute per step.

Requests with penalties, log-probabilities or structured output do not
speculate: their distributions depend on state the chunk's positions do not
have. Logits of a chunk match those of single-token steps up to rounding, as
chunked prefill's do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_NGRAM = 2
MAX_NGRAM = 4


class NgramIndex:
    """One sequence's n-grams and the position of the token that followed each one's latest occurrence."""

    def __init__(self) -> None:
        self._next: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # ids[:_indexed] have their n-grams recorded
        self._span: int | None = None  # the longest draft worth checking, from how the last one fared

    def verified(self, drafted: int, kept: int) -> None:
        """How the last draft fared: the next may be twice as long if all of it was kept, else one longer
        than what was (a miss at once: a one-token probe), so poor guesses cost little compute."""
        self._span = 2 * drafted if kept == drafted else kept + 1

    def draft(self, ids: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the latest earlier occurrence of `ids`' longest matching suffix."""
        for end in range(max(self._indexed, 1), len(ids)):  # the n-grams ending before `end` now have a next
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                self._next[tuple(ids[end - n : end])] = end
        self._indexed = len(ids)
        k = k if self._span is None else min(k, self._span)
        if k <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(ids)), MIN_NGRAM - 1, -1):
            start = self._next.get(tuple(ids[len(ids) - n :]))
            if start is not None:
                return list(ids[start : start + k])
        return []


def sampled(probs: torch.Tensor, draft: Sequence[int], generator: torch.Generator) -> list[int]:
    """The tokens a verified chunk yields for a sampled request, distributed exactly as sampling them one step
    at a time (speculative sampling with a draft that proposes each token for certain): `probs` [k + 1, V]
    is the request's distribution at each position of the chunk. Draft token d at position i is kept with
    probability probs[i, d]; else position i draws from probs[i] without d, and the chunk ends there. All
    kept, the last position draws one more."""
    tokens: list[int] = []
    for i, token in enumerate(draft):
        if torch.rand((), generator=generator, device=probs.device) < probs[i, token]:
            tokens.append(token)
            continue
        rest = probs[i].clone()
        rest[token] = 0
        tokens.append(int(torch.multinomial(rest, 1, generator=generator)))
        return tokens
    tokens.append(int(torch.multinomial(probs[len(draft)], 1, generator=generator)))
    return tokens


def accepted(greedy: Sequence[int], draft: Sequence[int]) -> list[int]:
    """The tokens a verified chunk yields: `greedy[i]` is the model's token after the chunk's i-th position
    (the last computed token, then the draft's); the draft is kept while it agrees, then the model's own."""
    tokens = []
    for i, token in enumerate(greedy):
        tokens.append(token)
        if i == len(draft) or token != draft[i]:
            break
    return tokens
