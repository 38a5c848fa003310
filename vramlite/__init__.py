"""vramlite: run big language models on one small GPU.

    import vramlite
    engine = vramlite.Engine.from_dir("path/to/model")
    print(engine.generate("床前明月光", max_tokens=32).text)

    model = vramlite.wrap(any_torch_model, quantize="int8", memory_limit="5GiB")  # BMInf's wrapper
"""

from importlib.metadata import PackageNotFoundError, version

from engine import Completion, Engine, FinishReason, SamplingParams
from engine.wrap import wrap

try:
    __version__ = version("vramlite")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["Completion", "Engine", "FinishReason", "SamplingParams", "__version__", "wrap"]
