"""Streaming detokenization: the text each new token adds, without re-decoding the whole sequence."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from vramlite.engine.tokenizer import Tokenizer

_CONTEXT = 5  # prompt tokens decoded ahead of the first generated one, as vLLM does
_MAX_CONTINUATION = 3  # a UTF-8 character has at most 3 bytes after its first


class IncrementalDetokenizer:
    """Text of generated ids as they arrive, by the prefix/read offset scheme of TGI and vLLM.

    Each `add` decodes a short window twice: the tokens already turned into text since the window's
    start, and the same plus the pending ones; the difference is the new text. Starting the window a
    few tokens back keeps a sentencepiece word's leading space (decoding "▁word" alone strips it).
    Text that ends in U+FFFD is held back: the last token stopped inside a multi-byte character. Cost
    per token is O(1); special tokens produce no text, unless not `skip_special_tokens`.

    The concatenated output is what decoding prompt + generated ids adds to the prompt's text up to
    its last complete character (for an empty or BOS-only prompt: `tokenizer.decode(generated_ids)`),
    once the generated ids end on a complete character. So a prompt cut inside a character (ids sent
    by a client) gets that whole character at the start of the output.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self._decode = functools.partial(tokenizer.decode, skip_special_tokens=skip_special_tokens)
        ids = list(prompt_ids)
        # The window must start between characters: byte fallback decodes a run of byte tokens that
        # starts mid-character to U+FFFD as a whole, the complete characters in it included. A prompt
        # may also end mid-character (ids from a client); its text counts as out up to the character
        # before, found by token (byte fallback shows the whole byte run as U+FFFD) or by text (a
        # byte-level token can hold the end of one character and the start of the next), and the
        # character comes out whole once complete.
        end = next((e for e in _back_from(len(ids)) if self._ends_character(ids, e)), len(ids))
        start = max(end - _CONTEXT, 0)
        start = next((b for b in _back_from(start) if self._starts_character(ids, b)), start)
        self._ids = ids[start:]
        self._read = end - start  # where the next window starts: the ids before it are text that is out
        self._done = max(len(self._decode(self._ids[: self._read]).rstrip("\ufffd")),
                         len(self._decode(self._ids).rstrip("\ufffd")))  # how much of the window's text is out
        self._chunks: list[str] = []

    def add(self, token_id: int) -> str:
        """Append a generated token; return the text it completes ("" while a character is unfinished)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        # No new text (a special token) or half a character: keep the window, so the next token still
        # has the context its text depends on.
        if len(text) <= self._done or text.endswith("\ufffd"):
            return ""
        new = text[self._done :]
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._done = len(self._decode(self._ids))
        self._chunks.append(new)
        return new

    def candidate_texts(self, token_ids: Sequence[int]) -> list[str]:
        """The text each of `token_ids` would bring out if it came next (held-back bytes of an unfinished
        character included, a character it leaves unfinished as U+FFFD): for log-probabilities' tokens."""
        return [self._decode([*self._ids, t])[self._done :] for t in token_ids]

    def flush(self) -> str:
        """At the end of generation: the held-back text of an unfinished character, shown as U+FFFD."""
        text = self._decode(self._ids)
        if len(text) <= self._done:
            return ""
        new = text[self._done :]
        self._done = len(text)
        self._chunks.append(new)
        return new

    def _ends_character(self, ids: list[int], end: int) -> bool:
        """Whether `end` follows a character's last token: some window ending there decodes cleanly."""
        begins = range(end - 1, max(end - 1 - _MAX_CONTINUATION, 0) - 1, -1)
        return end == 0 or any(not self._decode(ids[begin:end]).endswith("\ufffd") for begin in begins)

    def _starts_character(self, ids: list[int], begin: int) -> bool:
        """Whether `begin` is a character's first token: some window starting there decodes cleanly."""
        ends = range(begin + 1, min(begin + 1 + _MAX_CONTINUATION, len(ids)) + 1)
        return begin == 0 or any(not self._decode(ids[begin:end]).startswith("\ufffd") for end in ends)

    @property
    def text(self) -> str:
        """Everything `add` has returned so far."""
        return "".join(self._chunks)


def _back_from(position: int) -> range:
    """`position` and the few before it where a character that covers `position` could begin or end."""
    return range(position, max(position - _MAX_CONTINUATION, 0) - 1, -1)


def texts_at(tokenizer: Tokenizer, ids: Sequence[int], position: int, candidates: Sequence[int]) -> list[str]:
    """The text each of `candidates` brings out at `position` of `ids`, after the ids before it (the last few
    decoded as its context, as `IncrementalDetokenizer` does): for the log-probabilities of a prompt's tokens."""
    window = list(ids[max(position - _CONTEXT, 0) : position])
    done = len(tokenizer.decode(window).rstrip("\ufffd"))
    return [tokenizer.decode([*window, c])[done:] for c in candidates]
