"""Structured output: generation held to a regular expression or a JSON schema.

outlines-core compiles a pattern against the model's vocabulary (each token as
the bytes it writes, `Tokenizer.token_bytes`) into an index of the tokens
allowed from each state of the pattern's automaton; a request's `Constraint`
walks that index token by token, and the sampler sets every other token's logit
to -inf. Once the pattern is complete, only EOS is allowed. JSON schemas become
regular expressions first (nesting is bounded, whitespace between tokens is at
most one space), as vLLM's outlines backend does.

Compiling costs from milliseconds to seconds (a large vocabulary, a long
schema; a pattern such as `x{1,100000}` takes longer), so indexes are cached by
pattern, compiled one at a time (a costly pattern holds up other new patterns,
not cached ones or generation), and the server compiles a request's in a worker
thread before queueing it, off the engine's loop, in a child process that stops
a pattern after `pattern_timeout` seconds (`pattern_compiler`).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from vramlite.engine.pattern_compiler import PatternCompiler
from vramlite.engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # imported where used: an engine without structured output runs without outlines-core
    from outlines_core import Index, Vocabulary

    from vramlite.engine.sampler import SamplingParams

INDEX_CACHE = 64  # compiled patterns kept


def _outlines() -> Any:
    try:
        import outlines_core
        import outlines_core.json_schema
    except ImportError:
        raise ValueError("structured output needs the outlines-core package: pip install outlines-core") from None
    return outlines_core


def pattern_of(params: SamplingParams) -> str | None:
    """The regular expression a request's output must match: its `regex`, its JSON schema's, or the alternation
    of its `choice` strings (each literal); None if none. ValueError for a schema outlines-core cannot express."""
    if params.choice:
        return "|".join(map(re.escape, params.choice))
    if params.json_schema is None:
        return params.regex
    try:
        return _outlines().json_schema.build_regex_from_schema(params.json_schema)
    except (ValueError, TypeError) as e:
        raise ValueError(f"json_schema: {e}") from None


def canonical_schema(schema: str | dict[str, Any]) -> str:
    """A JSON schema (object or JSON text) as compact JSON text, so that a schema sent with other spacing
    shares its compiled index (keys keep their order: properties come out in the schema's order). ValueError
    if it is not a JSON object."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError("json_schema must be a JSON object (a JSON Schema)")
    return json.dumps(schema, separators=(",", ":"))


class Grammars:
    """Compiles patterns against one model's vocabulary (its tokenizer's tokens up to `vocab_size`, the logits'
    width; `eos_ids` end the output); thread-safe, cached. With a `timeout`, patterns compile in a child
    process (`PatternCompiler`), each stopped after that many seconds: a pattern whose automaton explodes
    (`[a-z]{1,20000}y` took 25 s and 0.8 GB on 2 cores) is refused instead of holding up every new pattern and
    filling the memory."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: tuple[int, ...],
                 timeout: float | None = None) -> None:
        self._tokenizer = tokenizer
        self._timeout = timeout
        self._vocab_size = vocab_size
        self._eos_ids = eos_ids
        self._vocabulary: Vocabulary | None = None
        self._compiler: PatternCompiler | None = None
        self._cache: OrderedDict[str, Index] = OrderedDict()  # least recently used first
        self._cache_lock = threading.Lock()
        self._compile_lock = threading.Lock()

    def index(self, pattern: str) -> Index:
        """The compiled index of `pattern` (cached). ValueError for a pattern that is invalid, or that no
        sequence of the vocabulary's tokens can spell."""
        index = self._cached(pattern)
        if index is not None:
            return index
        with self._compile_lock:
            index = self._cached(pattern)  # compiled by the thread this one waited for
            if index is None:
                index = self._compile(pattern)
                with self._cache_lock:
                    self._cache[pattern] = index
                    if len(self._cache) > INDEX_CACHE:
                        self._cache.popitem(last=False)
            return index

    def _cached(self, pattern: str) -> Index | None:
        with self._cache_lock:
            index = self._cache.get(pattern)
            if index is not None:
                self._cache.move_to_end(pattern)
            return index

    def index_for(self, params: SamplingParams) -> Index | None:
        """The compiled index of the pattern `params` asks for (None if none); ValueError as `index`."""
        pattern = pattern_of(params)
        return None if pattern is None else self.index(pattern)

    def constraint(self, params: SamplingParams) -> Constraint | None:
        """A fresh walk through the pattern `params` asks for (None if it asks for none)."""
        index = self.index_for(params)
        return None if index is None else Constraint(index, self._eos_ids)

    def _compile(self, pattern: str) -> Index:
        if not self._eos_ids:
            raise ValueError("structured output needs an EOS token to end on, and this model has none")
        index, vocabulary = _outlines().Index, self._vocabulary_once()
        try:
            if self._timeout is None:
                return index(pattern, vocabulary)
            if self._compiler is None:
                self._compiler = PatternCompiler(vocabulary, self._timeout)
            return self._compiler.compile(pattern)
        except ValueError as e:
            raise ValueError(f"output pattern: {e}") from None

    def _vocabulary_once(self) -> Vocabulary:
        if self._vocabulary is None:  # under the compile lock
            tokens: dict[bytes, list[int]] = {}
            for i, spelled in enumerate(self._tokenizer.token_bytes()[: self._vocab_size]):
                if spelled and i not in self._eos_ids:
                    tokens.setdefault(spelled, []).append(i)
            self._vocabulary = _outlines().Vocabulary(self._eos_ids[0], tokens)
        return self._vocabulary


class Constraint:
    """One sequence's walk through a compiled pattern: which tokens it may take next, then the token it took."""

    def __init__(self, index: Index, eos_ids: tuple[int, ...]) -> None:
        self._guide = _outlines().Guide(index)
        self._eos_ids = eos_ids

    def write_mask(self, out: torch.Tensor) -> None:
        """Write the allowed tokens into `out`, a CPU int32 [ceil(vocab / 32)] bitmask (bit i of word w: token
        32 w + i), every EOS id allowed where the pattern is complete."""
        self._guide.write_mask_into(out.data_ptr(), out.numel(), out.element_size())
        if self._guide.is_finished():
            for eos in self._eos_ids:
                out[eos // 32] |= _bit(eos % 32)

    def advance(self, token_id: int) -> None:
        """Move past a sampled token (an EOS ends the walk)."""
        if token_id not in self._eos_ids:
            self._guide.advance(token_id, return_tokens=False)


def _bit(i: int) -> int:
    """Bit i of an int32 word, as a signed int32 value."""
    return (1 << i) - (1 << 32) * (i == 31)


def allowed_tokens(constraints: list[Constraint], vocab_size: int, device: torch.device) -> torch.Tensor:
    """A bool [len(constraints), vocab_size] mask of the tokens each constraint allows next."""
    words = torch.zeros(len(constraints), (vocab_size + 31) // 32, dtype=torch.int32)
    for row, constraint in zip(words, constraints, strict=True):
        constraint.write_mask(row)
    bits = torch.arange(32, dtype=torch.int32, device=device)
    words = words.to(device, non_blocking=True)
    return ((words.unsqueeze(-1) >> bits) & 1).view(len(constraints), -1)[:, :vocab_size].bool()
