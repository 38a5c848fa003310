"""A GPU host may have the engine's packages only (torch, triton, transformers, ...): no FastAPI, pydantic,
jieba or outlines-core. There the engine must import and run, and `pytest -m gpu` must collect its tests, the
others skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the packages the engine does not need: the server's, the CPM tokenizers', structured output's, the test extras'
ABSENT = ("fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "sse_starlette", "httpx_sse", "openai",
          "schemathesis", "playwright", "jieba", "rjieba", "outlines_core")


def _run_without_server_packages(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter in which importing any of ABSENT fails as if it were not installed."""
    prelude = f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"
    env = {k: v for k, v in os.environ.items() if k != "CI"}  # CI requires every package (see conftest)
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # installed plugins of absent packages (schemathesis) are absent too
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_engine_generates_without_server_packages() -> None:
    proc = _run_without_server_packages(
        "import vramlite, vramlite.kernels\n"
        "from vramlite import models\n"
        "engine = vramlite.Engine.from_dir(models.path(), device='cpu')\n"
        "print(engine.generate('床前明月光', max_tokens=4, temperature=0, ignore_eos=True).completion_tokens)\n"
        "try:\n    engine.generate('x', regex='a+')\nexcept ValueError as e:\n    print(e)\n")
    assert proc.returncode == 0, proc.stderr
    generated, refused = proc.stdout.splitlines()[-2:]
    assert generated == "4"
    assert refused == "structured output needs the outlines-core package: pip install outlines-core"


def test_gpu_tests_collect_without_server_packages() -> None:
    proc = _run_without_server_packages(
        "import pytest\n"
        "sys.exit(pytest.main(['-m', 'gpu', '--collect-only', '-q', '-rs', '-p', 'no:cacheprovider']))\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any(line.startswith("tests/kernels/test_kernel_gpu.py::") for line in collected)
    assert any(line.startswith("tests/offload/test_identity.py::") for line in collected)
    assert "could not import 'fastapi'" in proc.stdout
