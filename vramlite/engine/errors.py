"""Errors the engine raises for things a user can cause and fix."""

from __future__ import annotations

GIB = 2**30
QUARTER_GIB = 2**28


class UnsupportedTaskError(ValueError):
    """The served model cannot do what a request asks: fill blanks (neither sentinels nor fill-in-the-middle
    tokens), or give embeddings (a model that does not read its prompt left to right alone)."""


class ModelLoadError(ValueError):
    """A model directory cannot be loaded: names the file or tensor and what was expected."""


class LoadOutOfMemoryError(ModelLoadError):
    """The GPU ran out of memory while the model loaded: names the budget that would fit."""

    def __init__(self, model_dir: object, cause: BaseException, free: int | None, total: int | None,
                 memory_limit: int | None) -> None:
        first_line = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        self.suggested_limit: int | None = None
        asked = f"memory_limit {memory_limit / GIB:.2f} GiB" if memory_limit else "no memory_limit (all of the GPU)"
        if free is None:
            budget = "set --memory-limit below the GPU's free memory"
        else:
            self.suggested_limit = max(free * 9 // 10 // QUARTER_GIB, 1) * QUARTER_GIB
            budget = (f"the GPU had {free / GIB:.2f} GiB free of {total / GIB:.2f} GiB when loading began; "
                      f"start with --memory-limit {self.suggested_limit / GIB:g}GiB")
        super().__init__(f"out of GPU memory loading {model_dir} with {asked} ({first_line}); {budget} so the "
                         "layers that do not fit stream from host memory, or lower max_batch_size or context")


class PromptTooLongError(ValueError):
    """A prompt does not fit the context, leaving no room for a generated token."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context = context
        super().__init__(
            f"prompt is {prompt_tokens} tokens but the context holds {context} tokens "
            f"(at most {context - 1} for the prompt, to leave room for a generated token); shorten the prompt"
        )
