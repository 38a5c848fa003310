"""A chat reply read as it streams: its thought split from its answer, and what may be a tool call held back
until it is read."""

from __future__ import annotations

from typing import Any

from vramlite.server.reasoning import ThoughtSplitter
from vramlite.server.tools import CallWatcher, ToolCall


class ReplyReader:
    """A reply read as it streams: its thought apart where `thinking` is not None (`ThoughtSplitter`), and with
    `tools` ("auto") answer text that may be a call held back (`CallWatcher`), the calls read from the whole
    answer at its end."""

    def __init__(self, tools: list[dict[str, Any]] | None, thinking: bool | None) -> None:
        self._tools = tools or []
        self._watcher = None if tools is None else CallWatcher()
        self._splitter = None if thinking is None else ThoughtSplitter(thinking)

    def feed(self, piece: str, last: bool) -> tuple[str, str, list[ToolCall]]:
        """The thought, answer text and calls that `piece` brings out (all that was held back if it is the last)."""
        thought, text, calls = "", piece, []
        if self._splitter is not None:
            thought, text = self._splitter.feed(piece)
            if last:
                more_thought, more_text = self._splitter.finish()
                thought, text = thought + more_thought, text + more_text
        if self._watcher is not None:
            text = self._watcher.feed(text)
            if last:
                rest, calls = self._watcher.finish(self._tools)
                text += rest
        return thought, text, calls
