"""Errors the engine raises for things a user can cause and fix."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A model directory cannot be loaded: names the file or tensor and what was expected."""


class PromptTooLongError(ValueError):
    """A prompt (plus the tokens asked for) does not fit the model's context."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context = context
        super().__init__(
            f"prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}, "
            f"but the context holds {context} tokens; shorten the prompt or lower max_tokens"
        )
