"""Streaming detokenization: the text each new token adds, without re-decoding the whole sequence."""

from __future__ import annotations

from collections.abc import Sequence

from engine.tokenizer import Tokenizer

_CONTEXT = 5  # prompt tokens decoded ahead of the first generated one, as vLLM does
_MAX_CONTINUATION = 3  # a UTF-8 character has at most 3 bytes after its first


class IncrementalDetokenizer:
    """Text of generated ids as they arrive, by the prefix/read offset scheme of TGI and vLLM.

    Each `add` decodes a short window twice: the already-emitted tokens since the window's start, and
    the same plus the pending ones; the difference is the new text. Starting the window a few tokens
    back keeps a sentencepiece word's leading space (decoding "▁word" alone strips it). Text that
    ends in U+FFFD is held back: the last token stopped inside a multi-byte character. Cost per token
    is O(1); special tokens produce no text.

    The concatenated output is the text that decoding prompt + generated ids adds to decoding the
    prompt alone (for an empty or BOS-only prompt: `tokenizer.decode(generated_ids)`), once the
    generated ids end on a complete character.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]) -> None:
        self._decode = tokenizer.decode
        ids = list(prompt_ids)
        # Windows must start and end between characters: a byte-fallback run cut mid-character decodes
        # to U+FFFD as a whole, the good characters in it included. The prompt may end mid-character
        # (ids given by a client): then the window after the first emitted text starts at that
        # character's first token.
        boundary = len(ids)
        for _ in range(_MAX_CONTINUATION):
            if boundary == 0 or self._ends_character(ids, boundary):
                break
            boundary -= 1
        start = max(boundary - _CONTEXT, 0)
        for _ in range(_MAX_CONTINUATION):
            if start == 0 or self._starts_character(ids, start):
                break
            start -= 1
        self._ids = ids[start:]  # the window: ids[:_read] are emitted (or prompt), the rest pending
        self._read = len(self._ids)
        self._next_start = boundary - start  # where the window starts once the pending text is out
        self._chunks: list[str] = []

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[: self._read])
        after = self._decode(self._ids)
        if after.endswith("\ufffd"):
            return ""
        # `after` extends `before`, except when the prompt ended inside a character that this token
        # completes: `before` then ends in U+FFFD that `after` replaces, and the character is new text.
        done = len(before) if after.startswith(before) else _common_prefix_length(before, after)
        text = after[done:]
        if not text:  # e.g. a special token: keep the window so the next token keeps its context
            return ""
        del self._ids[: self._next_start]
        self._read = self._next_start = len(self._ids)
        self._chunks.append(text)
        return text

    def _ends_character(self, ids: list[int], end: int) -> bool:
        """Whether `end` follows a character's last token: some window ending there decodes cleanly."""
        return any(not self._decode(ids[begin:end]).endswith("\ufffd")
                   for begin in range(end - 1, max(end - 1 - _MAX_CONTINUATION, 0) - 1, -1))

    def _starts_character(self, ids: list[int], begin: int) -> bool:
        """Whether `begin` is a character's first token: some window starting there decodes cleanly."""
        return any(not self._decode(ids[begin:end]).startswith("\ufffd")
                   for end in range(begin + 1, min(begin + 1 + _MAX_CONTINUATION, len(ids)) + 1))

    @property
    def text(self) -> str:
        """Everything `add` has returned so far."""
        return "".join(self._chunks)


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
