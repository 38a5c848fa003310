"""Log-probabilities of generated tokens (`vramlite.engine.Logprobs`) in each route's JSON: ours, and OpenAI's
completions, chat and responses formats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vramlite.engine import Logprobs, TokenLogprob


def _token(t: TokenLogprob) -> dict[str, Any]:
    return {"id": t.token_id, "text": t.text, "logprob": t.logprob}


def generate_logprobs(tokens: Sequence[Logprobs | None]) -> list[dict[str, Any] | None]:
    """`/generate`: per token `{"id", "text", "logprob", "top": [{"id", "text", "logprob"}]}` (null for a
    prompt's first token)."""
    return [lp and {**_token(lp.chosen), "top": [_token(t) for t in lp.top]} for lp in tokens]


class CompletionLogprobs:
    """`/v1/completions`: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` of each piece of a
    completion, the offsets running on from piece to piece of a stream. A token given as its text alone (an
    echoed prompt's first) has null log-probabilities, as OpenAI gives it."""

    def __init__(self) -> None:
        self.offset = 0

    def __call__(self, tokens: Sequence[Logprobs | str]) -> dict[str, Any]:
        texts = [t if isinstance(t, str) else t.chosen.text for t in tokens]
        offsets = []
        for text in texts:
            offsets.append(self.offset)
            self.offset += len(text)
        scored = [None if isinstance(t, str) else t for t in tokens]
        return {
            "tokens": texts,
            "token_logprobs": [lp and lp.chosen.logprob for lp in scored],
            # as OpenAI: the sampled token is among them, so there may be one more than asked for
            "top_logprobs": [lp and {t.text: t.logprob for t in (*lp.top, lp.chosen)} for lp in scored],
            "text_offset": offsets,
        }


def _chat_token(t: TokenLogprob) -> dict[str, Any]:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode())}


def token_logprobs(tokens: Sequence[Logprobs]) -> list[dict[str, Any]]:
    """`/v1/responses` (and chat's `content`): `[{"token", "logprob", "bytes", "top_logprobs": [...]}]`."""
    return [{**_chat_token(lp.chosen), "top_logprobs": [_chat_token(t) for t in lp.top]} for lp in tokens]


def chat_logprobs(tokens: Sequence[Logprobs]) -> dict[str, Any]:
    """`/v1/chat/completions`: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}`."""
    return {"content": token_logprobs(tokens), "refusal": None}
