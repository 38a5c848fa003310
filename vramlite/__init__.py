"""vramlite: run big language models on one small GPU.

    import vramlite
    engine = vramlite.Engine.from_dir("path/to/model")
    print(engine.generate("床前明月光", max_tokens=32).text)

    model = vramlite.wrap(any_torch_model, quantize="int8", memory_limit="5GiB")  # BMInf's wrapper

Subpackages, the arrows pointing one way: `vramlite.server` (HTTP daemon, CLI) → `vramlite.engine` (models,
scheduler, offload) → `vramlite.kernels` (int8 matmuls). The names above load on first use, so that importing
one subpackage (the kernels alone, say) does not load the others.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from vramlite._lazy import lazy_exports

if TYPE_CHECKING:
    from vramlite.engine import Completion, Engine, FinishReason, SamplingParams
    from vramlite.engine.wrap import wrap

try:
    __version__ = version("vramlite")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["Completion", "Engine", "FinishReason", "SamplingParams", "__version__", "wrap"]
# the engine's names from vramlite.engine, which says where each is defined (and loads it lazily too)
__getattr__, __dir__ = lazy_exports(__name__, {
    **dict.fromkeys(("Completion", "Engine", "FinishReason", "SamplingParams"), "vramlite.engine"),
    "wrap": "vramlite.engine.wrap",
})
