"""The model runner: owns the model and its KV cache, turns scheduled chunks into logits."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vramlite.engine.kv_cache import KVCache
from vramlite.engine.layers.attention import AttentionMetadata, CrossMetadata, EncoderBatch, PrefillChunk, sdpa_backends
from vramlite.engine.layers.cpu_layout import prefer_cpu_layout
from vramlite.engine.layers.linear import QuantizedLinear
from vramlite.engine.models.base import CausalLM
from vramlite.kernels import Backend, backend_for

if TYPE_CHECKING:
    from torch._dynamo.types import GuardFilterEntry

log = logging.getLogger(__name__)


def _step_guards(entries: Sequence[GuardFilterEntry]) -> list[bool]:
    """Dynamo's guard filter for a decode step: keep the guards on what changes from step to step (the token
    ids and the metadata: they pick the graph), on global state (grad mode and the like) and the relations of
    the dynamic sizes; drop those on what is fixed once the runner is built: the runner and its model (`self`:
    weights laid out, nothing reassigned), its KV cache tensors (`cache`, static) and module globals (the
    functions the model calls). Checking those ~1100 guards took 0.1 ms of the demo model's 1.2 ms step; Inductor
    still asserts the weights' sizes and strides."""
    keep = []
    for entry in entries:
        source = entry.orig_guard.originating_source
        while getattr(source, "base", None) is not None:
            source = source.base
        keep.append(not entry.is_global and getattr(source, "local_name", None) not in ("self", "cache"))
    return keep


# Inductor options for the decode step. Side by side on 2 Intel Xeon cores, the demo model at batch 1 in fp32: the
# guard filter took 10-14% off a step, the C++ wrapper 7%, the fused products 5%: about 1.25 -> 1.07 ms; the
# 130M LLaMA's step at batch 1 and 8, fp32 or int8, 6-10%. Compiling takes about twice as long.
DECODE_COMPILE_OPTIONS = {
    "guard_filter_fn": _step_guards,
    # the step's graph calls its kernels from C++, not from a Python wrapper (~60 calls a step)
    "cpp_wrapper": True,
    # a one-row product with a weight of at most 2048 x 2048 becomes a loop of Inductor's, fused with what is
    # around it: between two attentions, a layer of the demo model is one kernel
    "post_grad_fusion_options": {"decompose_mm_pass": {}},
}


def torch_compiles_decode() -> bool:
    """Whether this torch can compile decode steps: it must keep each runner's graphs apart (torch.compile's
    `isolate_recompiles`, torch 2.13)."""
    return "isolate_recompiles" in inspect.signature(torch.compile).parameters


def warm_up_rows(limit: int) -> list[int]:
    """Row counts that reach every row bucket the int8 kernels tune for, up to `limit` rows a step: 1, 2, 4, ...
    (W8A16 tiles by powers of two up to 16 rows, W8A8 tunes per power of two of the rows), then `limit`."""
    rows = [1 << i for i in range(max(limit, 1).bit_length()) if 1 << i < limit]
    return [*rows, limit]


ScoreFn = Callable[[int, torch.Tensor], None]
"""Takes the logits [rows, vocab] of a chunk's tokens first, first + 1, ... (see `ModelRunner.forward`)."""
HiddenFn = Callable[[torch.Tensor], None]
"""Takes the final hidden states [tokens, hidden] of a chunk's tokens (see `ModelRunner.forward`)."""


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence: `token_ids` go at positions start, start+1, ... of cache `slot`.

    For an encoder-decoder model, `token_ids` are decoder tokens; `encoder_ids`
    (given once, with the sequence's first decoder tokens) is the encoder's
    whole input, encoded in this step into the slot's cross cache.
    """

    slot: int
    token_ids: Sequence[int]
    start: int
    encoder_ids: Sequence[int] = ()


class ModelRunner:
    """Runs one forward pass over a packed batch of chunks (decode tokens and prefill pieces mixed)."""

    def __init__(self, model: CausalLM, device: torch.device, dtype: torch.dtype, num_slots: int,
                 context: int, compile_decode: bool = False, cpu_layout: str = "auto",
                 max_chunk: int | None = None, kv_int8: bool = False) -> None:
        """`max_chunk`: the most tokens a prefill chunk may have (the scheduler's step budget), which lets
        sliding-window layers keep ring caches (`KVCache`); None: any, and no rings. `kv_int8`: keys and values
        cached in int8."""
        cfg = model.config
        self.model = model
        self.device = device
        self.dtype = dtype
        self.context = context
        self.cache = KVCache(cfg.num_layers, num_slots, context + cfg.cache_prefix, cfg.num_kv_heads, cfg.head_dim,
                             dtype, device, cross_context=context if cfg.is_encoder_decoder else 0,
                             windows=cfg.layer_windows, max_chunk=max_chunk, int8=kv_int8)
        self.max_chunk = max_chunk if min(self.cache.lengths) < self.cache.context else None
        compiled = compile_decode and self._compilable()
        prefer_cpu_layout(model, batch_hint=num_slots, layout=cpu_layout, dtype=dtype, compiled=compiled)
        self._decode_step = None
        if compiled:
            for t in (*self.cache.k, *self.cache.v):
                # static: else a cache dimension equal to the warm-up batch size (2 KV heads) would be
                # unified with it, and every other batch size would compile a graph of its own
                torch._dynamo.mark_static(t)
            # isolated: every runner compiles the same function, and Dynamo would keep the graphs of a function
            # together, count them together (past its limit, 8, a third engine that batches in one process
            # would run eagerly) and, as the guards do not look at the model, let one runner pick another's
            self._decode_step = torch.compile(self._decode_logits, dynamic=True, isolate_recompiles=True,
                                              options=DECODE_COMPILE_OPTIONS)
            self._compile_now()

    def _compile_now(self) -> None:
        """Run decode steps in slots 0 and 1 so that they compile at load, not in a user's first request: one
        sequence, and for an engine that batches, two (two graphs; any batch size reuses the second). The
        slots' cache is overwritten by the next prefill there."""
        if self.context < 3:
            return
        start = time.perf_counter()
        batched = self.cache.num_slots > 1
        self.forward([Chunk(0, [0, 0], 0), *([Chunk(1, [0, 0], 0)] if batched else [])])
        self.forward([Chunk(0, [0], 2)])
        if batched:
            self.forward([Chunk(0, [0], 2), Chunk(1, [0], 1)])
        if self._decode_step is not None:
            log.info("compiled the decode steps in %.1f s", time.perf_counter() - start)

    def warm_up_kernels(self, max_tokens_per_step: int) -> None:
        """On a GPU with the Triton int8 kernels, run the forward passes of `warm_up_batches` now, at load:
        Triton compiles and times a kernel's configs on the first call of each shape and row bucket, seconds
        each, which the first requests would otherwise wait for. The slots' cache is overwritten by their next
        prefill."""
        if self.device.type != "cuda" or backend_for(self.device) is Backend.REFERENCE \
                or not any(isinstance(m, QuantizedLinear) for m in self.model.modules()):
            return
        start = time.perf_counter()
        batches = self.warm_up_batches(max_tokens_per_step)
        for chunks in batches:
            self.forward(chunks)
        torch.cuda.synchronize(self.device)
        log.info("int8 kernels compiled and tuned in %d forward passes in %.1f s", len(batches),
                 time.perf_counter() - start)

    def warm_up_batches(self, max_tokens_per_step: int) -> list[list[Chunk]]:
        """Forward passes whose products reach every row bucket the int8 kernels tune for (`warm_up_rows`) in
        this model's steps: prefills of 1, 2, 4, ... tokens in slot 0, up to a step's token budget, or up to
        the context for a model whose prompts run whole past it (CPM-Ant's; an encoder's input); and where a
        prefill has more rows than tokens (CPM-Ant's prompt tokens in front), decode steps of 1, 2, 4, ...
        sequences, up to the slots."""
        cfg = self.model.config
        whole = cfg.whole_prompt or cfg.is_encoder_decoder
        encoder = self.cache.cross_k is not None
        batches = [[Chunk(0, [0] * n, 0, [0] * n if encoder else ())]
                   for n in warm_up_rows(self.context if whole else min(max_tokens_per_step, self.context))]
        if cfg.cache_prefix:
            batches += [[Chunk(slot, [0], 1) for slot in range(b)] for b in warm_up_rows(self.cache.num_slots)]
        return batches

    def _compilable(self) -> bool:
        """Whether decode steps can run compiled by torch.compile (`_decode_logits`); logs why not.

        A decode step is mostly per-op overhead on a small model (norms, rotary, residuals: ~150 small ops),
        which Inductor fuses into a few loops (DECODE_COMPILE_OPTIONS). On 2 Intel Xeon cores, compiled steps
        ran faster: the demo model 1.4x at batch 1 and 1.45x at batch 8 in fp32, 1.45x at batch 1 with int8
        weights; a 130M LLaMA 1.15x at batch 1 in fp32, 1.45x at batch 8 in bf16, and with int8 weights in
        oneDNN's layout 1.9x at batch 1 and 2x at batch 8, the per-token quantization of their inputs fused
        (benchmarks/decode_cpu.py, each implementation in a process of its own). Prefill and mixed steps run
        eagerly. Compiling takes 8-70 s on 2 cores, at load, so it is opt-in.
        """
        if self.device.type != "cpu":
            reason = "it is measured and tested on the CPU only"
        elif self.model.offload is not None:
            reason = "layers are streamed under a memory limit"
        elif self.cache.cross_k is not None:
            reason = "encoder-decoder models decode eagerly"
        elif self.max_chunk is not None:
            reason = "sliding-window layers keep ring caches"
        elif self.cache.int8:
            reason = "the KV cache is int8"
        elif not torch_compiles_decode():
            reason = f"torch {torch.__version__} cannot keep each engine's graphs apart (isolate_recompiles: 2.13)"
        else:
            log.info("compiled decode: compiling the decode steps (tens of seconds)")
            return True
        log.warning("compiled decode is off: %s; decode steps run eagerly", reason)
        return False

    def _decode_logits(self, ids: torch.Tensor, meta: AttentionMetadata,
                       cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> torch.Tensor:
        return self.model.compute_logits(self.model(ids, meta, cache))

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk], scoring: Mapping[int, ScoreFn] | None = None,
                hidden: Mapping[int, HiddenFn] | None = None) -> torch.Tensor:
        """Logits [len(chunks), vocab] (fp32) for the last token of each chunk, in the given order.

        For each chunk index i in `scoring`, also calls `scoring[i](first, logits)` with the fp32 logits of
        every token of that chunk from its `first`, in blocks of at most `num_slots` rows: the memory plan
        counts that many rows of logits (`loader.workspace_bytes`), however long the chunk (prompt
        log-probabilities). For each i in `hidden`, calls `hidden[i](states)` with the final hidden states
        (`CausalLM.final_hidden`) of every token of that chunk (embeddings)."""
        ids, meta, spans = self._prepare(chunks)
        rows = [end - 1 for _, end in spans]  # each chunk's last token's row in the packing, in the given order
        last = slice(None) if rows == list(range(len(ids))) else torch.tensor(rows, device=self.device)
        if self._decode_step is not None and not meta.prefills and not scoring and not hidden:
            # slots as a tensor, not a slice: a slice's start would be compiled in (slots 0 and 1 apart)
            meta.decode_slots = meta.write_slots
            if meta.num_decode > 1 and meta.decode_mask is None:  # one graph for batches, lengths equal or not
                meta.decode_mask = torch.ones(meta.num_decode, 1, 1, meta.decode_kv_len, dtype=torch.bool,
                                              device=self.device)
            try:
                logits = self._decode_step(ids, meta, (self.cache.k, self.cache.v))
            except Exception:  # a compiler that fails here must not take the server down: go on eagerly
                log.exception("compiled decode failed; decode steps run eagerly from now on")
                self._decode_step = None
            else:
                return logits[last].float()
        states = self._run(ids, meta)
        logits = self.model.compute_logits(states[last]).float()
        block = self.cache.num_slots
        for i, score in (scoring or {}).items():
            begin, end = spans[i]
            for first in range(begin, end, block):
                score(first - begin, self.model.compute_logits(states[first : min(first + block, end)]).float())
        for i, take in (hidden or {}).items():
            begin, end = spans[i]
            take(self.model.final_hidden(states[begin:end]))
        return logits

    @torch.inference_mode()
    def forward_all(self, chunks: Sequence[Chunk]) -> list[torch.Tensor]:
        """Logits [len(tokens), vocab] for every token of each chunk (for tests and scoring)."""
        ids, meta, spans = self._prepare(chunks)
        logits = self.model.compute_logits(self._run(ids, meta)).float()
        return [logits[s:e] for s, e in spans]

    def _prepare(self, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, AttentionMetadata, list[tuple[int, int]]]:
        """The packed token ids, the step's attention metadata, and each chunk's [start, end) in the packing."""
        for c in chunks:
            if not c.token_ids or c.start + len(c.token_ids) > self.context:
                raise ValueError(f"chunk of {len(c.token_ids)} tokens at {c.start} does not fit {self.context}")
            if self.max_chunk is not None and len(c.token_ids) > self.max_chunk:
                raise ValueError(f"chunk of {len(c.token_ids)} tokens: the ring caches of sliding-window layers "
                                 f"take {self.max_chunk} at most")
            if c.encoder_ids and (self.cache.cross_k is None or len(c.encoder_ids) > self.context):
                raise ValueError(f"encoder input of {len(c.encoder_ids)} tokens: the model has no encoder or "
                                 f"the input does not fit {self.context}")
        # Decode tokens first (sorted by slot so a batch in consecutive slots is read as a view). A sequence's
        # first chunk is a prefill even when it is one token: a model may put more in front of it (CPM-Ant's
        # prompt tokens), and a decode step reads only what is already cached.
        is_decode = [len(c.token_ids) == 1 and c.start > 0 for c in chunks]
        decode = sorted((i for i, d in enumerate(is_decode) if d), key=lambda i: chunks[i].slot)
        prefill = [i for i, d in enumerate(is_decode) if not d]
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        spans: list[tuple[int, int]] = [(0, 0)] * len(chunks)
        prefills: list[PrefillChunk] = []
        for i in decode + prefill:
            c = chunks[i]
            n, begin = len(c.token_ids), len(tokens)
            tokens.extend(c.token_ids)
            positions.extend(range(c.start, c.start + n))
            slots.extend([c.slot] * n)
            spans[i] = (begin, begin + n)
            if not is_decode[i]:
                prefills.append(PrefillChunk(begin, begin + n, c.slot, c.start + n, self._chunk_mask(c.start, n)))
        meta = AttentionMetadata(
            positions=torch.tensor(positions, device=self.device),
            write_slots=torch.tensor(slots, device=self.device),
            num_decode=len(decode),
            decode_slots=self._slots([chunks[i].slot for i in decode]),
            decode_kv_len=max((chunks[i].start + 1 for i in decode), default=0),
            decode_mask=self._decode_mask([chunks[i].start + 1 for i in decode]),
            prefills=prefills,
        )
        if self.cache.cross_k is not None:
            meta.cross = self._cross_metadata([chunks[i] for i in decode], [chunks[i] for i in prefill])
        return torch.tensor(tokens, device=self.device), meta, spans

    def _run(self, ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        cache = (self.cache.k, self.cache.v)
        if self.cache.cross_k is not None:
            cache += (self.cache.cross_k, self.cache.cross_v)
        with sdpa_backends(self.device):
            return self.model(ids, meta, cache)

    def _cross_metadata(self, decode: list[Chunk], prefill: list[Chunk]) -> CrossMetadata:
        """Records the encoder lengths of this step's new inputs, then what each decoder chunk attends to."""
        encoding = [c for c in (*decode, *prefill) if c.encoder_ids]
        for c in encoding:
            self.cache.cross_lens[c.slot] = len(c.encoder_ids)
        lens = self.cache.cross_lens
        empty = [c.slot for c in (*decode, *prefill) if not lens[c.slot]]
        if empty:
            raise ValueError(f"slot {empty[0]} has no encoder output: its first chunk must carry encoder_ids")
        encoder = None
        if encoding:
            spans, ids, positions, slots = [], [], [], []
            for c in encoding:
                spans.append((len(ids), len(ids) + len(c.encoder_ids)))
                ids.extend(c.encoder_ids)
                positions.extend(range(len(c.encoder_ids)))
                slots.extend([c.slot] * len(c.encoder_ids))
            encoder = EncoderBatch(*(torch.tensor(t, device=self.device) for t in (ids, positions, slots)), spans)
        decode_lens = [lens[c.slot] for c in decode]
        return CrossMetadata(encoder, max(decode_lens, default=0), self._decode_mask(decode_lens),
                             [lens[c.slot] for c in prefill])

    def _slots(self, slots: list[int]) -> slice | torch.Tensor:
        if slots and slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self.device)

    def _decode_mask(self, kv_lens: list[int]) -> torch.Tensor | None:
        if len(set(kv_lens)) <= 1:
            return None
        lens = torch.tensor(kv_lens, device=self.device)
        return (torch.arange(max(kv_lens), device=self.device) < lens[:, None])[:, None, None, :]

    def _chunk_mask(self, start: int, n: int) -> torch.Tensor | None:
        if start == 0:
            return None
        q_pos = torch.arange(start, start + n, device=self.device)
        return torch.arange(start + n, device=self.device)[None, :] <= q_pos[:, None]
