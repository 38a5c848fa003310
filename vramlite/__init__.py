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
    from vramlite.engine.engine import Completion, Engine
    from vramlite.engine.sampler import SamplingParams
    from vramlite.engine.sequence import FinishReason
    from vramlite.engine.wrap import wrap

try:
    __version__ = version("vramlite")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["Completion", "Engine", "FinishReason", "SamplingParams", "__version__", "wrap"]
__getattr__, __dir__ = lazy_exports(__name__, {
    "Completion": "vramlite.engine.engine", "Engine": "vramlite.engine.engine",
    "SamplingParams": "vramlite.engine.sampler", "FinishReason": "vramlite.engine.sequence",
    "wrap": "vramlite.engine.wrap",
})
