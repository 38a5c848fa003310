"""Our top-level package `kernels` shares its name with Hugging Face's hub-kernels package, which transformers
probes for.

transformers 5.x: `is_kernels_available()` = `importlib.util.find_spec("kernels")` (finds ours whenever the repo
is on sys.path) and a version from `importlib.metadata` in [0.18.2, 0.19): "kernels" maps to the `vramlite`
distribution (0.1.0) when installed, and without metadata transformers imports the package and reads its
`__version__`, which ours does not define. Either way the probe says no, and `hub_kernels` does not
`from kernels import CUDAProperties, ...` from us. It would if Hugging Face's `kernels` were installed too: its
metadata would vouch for whichever `kernels` comes first on sys.path (see the xfail below). Each check runs in a
fresh interpreter: transformers caches the probe.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]

PROBE = """
import importlib.metadata, importlib.util, json
import transformers
from transformers import LlamaForCausalLM
from transformers.utils import import_utils

result = {"origin": importlib.util.find_spec("kernels").origin, "available": import_utils.is_kernels_available()}

# A source checkout with no metadata: transformers falls back to importing `kernels` and reading __version__.
real_version = importlib.metadata.version
def version(name):
    if name in ("kernels", "vramlite"):
        raise importlib.metadata.PackageNotFoundError(name)
    return real_version(name)
importlib.metadata.version = version
result["without_metadata"] = import_utils._is_package_available("kernels", return_version=True)
print(json.dumps(result))
"""


def _python(code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    env_path = str(REPO) + (f":{extra_path}" if extra_path else "")
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**_clean_env(), "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}


def test_transformers_imports_and_does_not_take_ours_for_hub_kernels() -> None:
    proc = _python(PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["origin"] == str(REPO / "kernels" / "__init__.py")  # the probe does see ours...
    assert result["available"] is False  # ...and rejects it
    assert result["without_metadata"] == [True, "N/A"]  # imports cleanly, claims no version


@pytest.mark.xfail(
    strict=True,
    reason="name collision: with Hugging Face's `kernels` installed, transformers imports hub-kernel names from "
    "ours; renaming our package is the robust fix",
)
def test_transformers_imports_beside_hugging_face_kernels(tmp_path: Path) -> None:
    dist = tmp_path / "kernels-0.18.5.dist-info"  # what `pip install kernels` leaves, minus the code
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.18.5\n")
    proc = _python("from transformers import LlamaForCausalLM", extra_path=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
