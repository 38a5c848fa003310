"""A reasoning model's thought (`<think>...</think>`: Qwen 3, QwQ, DeepSeek-R1 and its distills) told apart from
its answer, as vLLM's reasoning parsers and llama.cpp's `--reasoning-format` do, when the server's
`reasoning_format` is "think".

A reply that opens with `<think>` thinks until `</think>`; one whose prompt ends with `<think>` (DeepSeek-R1's
template opens the thought itself) thinks from its first token. Everything after `</think>` is the answer, its
leading whitespace dropped; a reply that never opens a thought is all answer, and one cut off inside its thought
(max_tokens) all thought.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def opens_in_thought(prompt_text: str) -> bool:
    """Whether a prompt ending so leaves the reply inside a thought."""
    return prompt_text.rstrip().endswith(THINK_START)


class ThoughtSplitter:
    """A reply's text, fed as it streams, as (thought, answer) pieces; text that may be the start of a tag it
    waits for is held back until it is known."""

    def __init__(self, in_thought: bool = False) -> None:
        self.state = "thought" if in_thought else "start"  # start: may still open with <think>
        self.thought = in_thought  # whether the reply has a thought
        self._held = ""
        self._answer_begun = False

    def feed(self, piece: str) -> tuple[str, str]:
        text = self._held + piece
        self._held = ""
        if self.state == "start":
            stripped = text.lstrip()
            if stripped.startswith(THINK_START):
                self.state, self.thought = "thought", True
                text = stripped[len(THINK_START) :]
            elif THINK_START.startswith(stripped):  # all whitespace, or the tag's beginning: wait
                self._held = text
                return "", ""
            else:
                self.state = "answer"
        if self.state == "thought":
            at = text.find(THINK_END)
            if at < 0:
                keep = tag_start_at_end(text, THINK_END)
                self._held = text[len(text) - keep :]
                return text[: len(text) - keep], ""
            self.state = "answer"
            thought, text = text[:at], text[at + len(THINK_END) :]
            return thought, self._answer(text)
        return "", self._answer(text)

    def finish(self) -> tuple[str, str]:
        """At the reply's end: what was held back, as thought or answer."""
        held, self._held = self._held, ""
        return (held, "") if self.state == "thought" else ("", self._answer(held))

    def _answer(self, text: str) -> str:
        if not self._answer_begun:
            text = text.lstrip()
            self._answer_begun = bool(text)
        return text


def tag_start_at_end(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper beginning of `tag` (text to hold back while the
    tag may be coming)."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:n])), 0)


def split_thought(text: str, in_thought: bool = False) -> tuple[str | None, str]:
    """A whole reply's thought (None if it has none) and answer."""
    splitter = ThoughtSplitter(in_thought)
    thought, answer = splitter.feed(text)
    rest_thought, rest_answer = splitter.finish()
    return (thought + rest_thought if splitter.thought else None), answer + rest_answer
