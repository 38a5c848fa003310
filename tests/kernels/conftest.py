"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else in Triton's CPU interpreter.

`triton.jit` reads TRITON_INTERPRET when it decorates a function: for triton's own jit functions (`tl.sum`,
`tl.max`, ...) when triton is imported, for ours when `vramlite.kernels` is. In a full test run both happen before this
conftest loads (test modules and `vramlite.kernels` import them), so setting the variable here would come
too late. Instead, without a GPU, each test sets it and swaps every jit function of `triton.language` and
`vramlite.kernels` for an interpreted one. Afterwards it restores those modules and triton.language's classes as they
were: the interpreter patches them and, for nested device functions, does not undo all of it (triton 3.9),
which would break compiling (test_kernel_compile.py) later in the same process.
"""

import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@functools.cache
def _interpreted(fn: Callable) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def _snapshot() -> list[tuple[object, dict]]:
    """(owner, its attributes) for the triton.language and vramlite.kernels modules and triton.language's classes."""
    saved = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(("triton.language", "vramlite.kernels.")):
            continue
        saved.append((module, dict(vars(module))))
        if name.startswith("triton.language"):
            saved += [(v, dict(vars(v))) for v in vars(module).values() if isinstance(v, type) and v.__module__ == name]
    return saved


def _restore(saved: list[tuple[object, dict]]) -> None:
    for owner, attrs in saved:
        current = vars(owner)
        if isinstance(owner, type):  # modules keep what the interpreter added: its cached rewrites use them
            for attr in [a for a in current if a not in attrs]:
                delattr(owner, attr)
        for attr, value in attrs.items():
            if current.get(attr) is not value:
                setattr(owner, attr, value)


@pytest.fixture(autouse=True)
def _triton_interpreter_without_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if HAS_CUDA or "triton" not in sys.modules:
        yield
        return
    from triton.runtime.jit import JITFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    saved = _snapshot()
    for owner, attrs in saved:
        for attr, value in attrs.items():
            if type(value) is JITFunction:
                setattr(owner, attr, _interpreted(value.fn))
    yield
    _restore(saved)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
