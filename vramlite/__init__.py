"""vramlite: run big language models on one small GPU.

    import vramlite
    engine = vramlite.Engine.from_dir("path/to/model")
    print(engine.generate("床前明月光", max_tokens=32).text)

    model = vramlite.wrap(any_torch_model, quantize="int8", memory_limit="5GiB")  # BMInf's wrapper

Subpackages, the arrows pointing one way: `vramlite.server` (HTTP daemon, CLI) → `vramlite.engine` (models,
scheduler, offload) → `vramlite.kernels` (int8 matmuls). The names above load on first use, so that importing
one subpackage (the kernels alone, say) does not load the others.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vramlite.engine import Completion, Engine, FinishReason, SamplingParams
    from vramlite.engine.wrap import wrap

try:
    __version__ = version("vramlite")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_LAZY = {"Completion": "vramlite.engine", "Engine": "vramlite.engine", "FinishReason": "vramlite.engine",
         "SamplingParams": "vramlite.engine", "wrap": "vramlite.engine.wrap"}

__all__ = ["Completion", "Engine", "FinishReason", "SamplingParams", "__version__", "wrap"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vramlite' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
