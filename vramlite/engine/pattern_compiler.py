"""Structured-output patterns compiled in a child process that can be stopped: a pattern whose automaton explodes
is refused after a timeout instead of holding up every new pattern and filling the memory.

One child Python (outlines-core alone, no torch) serves one vocabulary: it receives the vocabulary once, then
compiles pattern after pattern, each answer a pickled `Index` or the pattern's ValueError. A compile over the
timeout kills the child; the next pattern starts a fresh one. Messages are pickles behind an 8-byte length.
"""

from __future__ import annotations

import os
import pickle
import selectors
import struct
import subprocess
import sys
import tempfile
import time
import weakref
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outlines_core import Index, Vocabulary

_LENGTH = struct.Struct("<Q")

_CHILD = """
import pickle, struct, sys
from outlines_core import Index

def read(n):
    data = b""
    while len(data) < n:
        chunk = sys.stdin.buffer.read(n - len(data))
        if not chunk:
            sys.exit(0)  # the parent is gone, or closed the pipe
        data += chunk
    return data

def receive():
    (length,) = struct.unpack("<Q", read(8))
    return pickle.loads(read(length))

def send(obj):
    data = pickle.dumps(obj)
    sys.stdout.buffer.write(struct.pack("<Q", len(data)) + data)
    sys.stdout.buffer.flush()

vocabulary = receive()
while True:
    pattern = receive()
    try:
        result = Index(pattern, vocabulary)
    except ValueError as e:
        result = ValueError(str(e))
    send(result)
"""


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj)
    return _LENGTH.pack(len(data)) + data


def _read(stream: IO[bytes], n: int, deadline: float) -> bytes:
    """`n` bytes from `stream`; TimeoutError past `deadline` (time.monotonic), EOFError if it ends."""
    data = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise TimeoutError
            chunk = os.read(stream.fileno(), n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
    return bytes(data)


def _kill(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()
    for pipe in (process.stdin, process.stdout):
        if pipe is not None:
            pipe.close()


class PatternCompiler:
    """Compiles patterns against `vocabulary` in a child process, each within `timeout` seconds. Not
    thread-safe: one caller at a time (`Grammars` compiles under a lock)."""

    def __init__(self, vocabulary: Vocabulary, timeout: float) -> None:
        self.vocabulary = vocabulary
        self.timeout = timeout
        self._process: subprocess.Popen | None = None
        self._stderr: IO[bytes] | None = None

    def compile(self, pattern: str) -> Index:
        """The index of `pattern`; ValueError for an invalid pattern or one over the timeout, RuntimeError if the
        child dies."""
        try:
            process = self._started()
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(_frame(pattern))
            process.stdin.flush()
            deadline = time.monotonic() + self.timeout
            (length,) = _LENGTH.unpack(_read(process.stdout, _LENGTH.size, deadline))
            result = pickle.loads(_read(process.stdout, length, deadline))  # from our own child process
        except TimeoutError:
            self.close()
            raise ValueError(f"it took over {self.timeout:g} s to compile (a bounded repetition such as "
                             "[a-z]{1,20000} grows the automaton with its bound); simplify it") from None
        except (EOFError, BrokenPipeError):  # the child died, perhaps before it took the vocabulary
            child, detail = self._process, self._stderr_tail()
            self.close()  # reaps it: its exit status is known after
            code = None if child is None else child.returncode
            raise RuntimeError(f"the pattern compiler exited with {code}: {detail}") from None
        if isinstance(result, ValueError):
            raise result
        return result

    def close(self) -> None:
        """Stop the child, if one runs (the next `compile` starts another)."""
        if self._process is not None:
            _kill(self._process)
            self._process = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _started(self) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            self.close()
            # a file, not a pipe: a chatty child never blocks on it; closed by close()
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
            self._process = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, stderr=self._stderr)
            weakref.finalize(self, _kill, self._process)
            assert self._process.stdin is not None
            self._process.stdin.write(_frame(self.vocabulary))
            self._process.stdin.flush()
        return self._process

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-500:]
