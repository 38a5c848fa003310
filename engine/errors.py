"""Errors the engine raises for things a user can cause and fix."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model directory cannot be loaded: names the file or tensor and what was expected."""


class PromptTooLongError(ValueError):
    """A prompt does not fit the context, leaving no room for a generated token."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context = context
        super().__init__(
            f"prompt is {prompt_tokens} tokens but the context holds {context} tokens "
            f"(at most {context - 1} for the prompt, to leave room for a generated token); shorten the prompt"
        )
