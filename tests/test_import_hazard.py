"""Nothing of ours answers to a top-level name but `vramlite`, so nothing else of that name shadows ours or is
shadowed by it. transformers imports Hugging Face's hub-kernels package as `kernels` (5.25 and later depend on
it) and, when ours had that name, took whichever came first on sys.path (a source checkout puts ours first) and
failed to import names it does not have; and a user's own `engine.py` beside a script that imported vramlite
took the place of our `engine`. Each check runs in a fresh interpreter with the repo on sys.path: transformers
caches its probe.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, extra_path: str = "", cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(REPO) + (f":{extra_path}" if extra_path else "")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_users_modules_of_our_old_names_do_not_shadow_ours(tmp_path: Path) -> None:
    """`python -c` puts the working directory first on sys.path, as `python script.py` puts the script's."""
    for name in ("engine", "server", "kernels"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s own {name}.py')\n")
    proc = _python("import vramlite, vramlite.kernels, vramlite.server.cli; print(vramlite.Engine.__module__)",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["vramlite.engine.engine"]


def test_the_wheel_packages_vramlite_alone() -> None:
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert packages["include"] == ["vramlite*"]


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
