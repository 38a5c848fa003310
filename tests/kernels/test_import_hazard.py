"""Nothing of ours answers to the name `kernels`: transformers imports Hugging Face's hub-kernels package by that
name (5.25 and later depend on it) and, had ours kept the name, took whichever came first on sys.path (a
source checkout puts ours first) and failed to import names it does not have. Each check runs in a fresh
interpreter with the repo first on sys.path: transformers caches its probe.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]


def _python(code: str, extra_path: str = "") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(REPO) + (f":{extra_path}" if extra_path else "")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_name_kernels_is_not_ours() -> None:
    proc = _python("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
                   "print(json.dumps(s and s.origin))")
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = json.loads(proc.stdout.strip().splitlines()[-1])
    assert origin is None or REPO not in (Path(origin).parent, Path(origin).parent.parent), origin  # HF's, if any


def test_transformers_imports_beside_hugging_face_kernels(tmp_path: Path) -> None:
    """With metadata that vouches for a `kernels` in the version range transformers accepts (what `pip install
    kernels` leaves, minus the code): before the rename, transformers imported hub-kernel names from ours."""
    from transformers.utils import import_utils

    version = import_utils.KERNELS_MIN_VERSION
    dist = tmp_path / f"kernels-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    proc = _python("from transformers import LlamaForCausalLM", extra_path=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
