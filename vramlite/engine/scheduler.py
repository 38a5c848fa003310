"""Continuous batching: which sequences run this step, and how many of their tokens.

Plain Python, no torch. Each step, running sequences come first: every
decoding one gets its 1 token, then prefilling ones take chunks of their
prompts, in arrival order; then waiting sequences are admitted, FIFO, while there is a free
cache slot and token budget left. A long prompt is thus prefilled over several
steps without stalling the streams already running.

An encoder-decoder prompt is encoded whole in its first step, never in
pieces, and so is the prompt of a model whose prompt attends both ways
(`Sequence.whole_prompt`): its tokens count against the budget, and one that
does not fit what is left waits for the next step, unless nothing but decode
tokens is scheduled yet — then it runs over the budget, so even an input
longer than the budget gets its turn.

What the budget has left after all that goes to speculative decoding: a
decoding sequence with drafted tokens (`Sequence.draft`, prompt lookup) runs
them after its pending one, in batch order, so drafts never delay a prompt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from collections.abc import Sequence as SeqOf
from dataclasses import dataclass

from vramlite.engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    """`max_batch_size` sequences at once (KV cache slots); `max_tokens_per_step` tokens per forward;
    `prefix_caching`: a prompt reuses the keys and values a freed slot holds of its first tokens."""

    max_batch_size: int = 8
    max_tokens_per_step: int = 512
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be ≥ 1, got {self.max_batch_size}")
        if self.max_tokens_per_step < self.max_batch_size:
            raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) must be ≥ max_batch_size "
                             f"({self.max_batch_size}) so every running sequence can decode each step")


class Scheduler:
    """Waiting queue + running set; slots come from `allocate(token_ids, running)` (with how many of those tokens
    the slot already holds; `running`: each running slot's tokens and how many it computed) and go back through
    `release(slot, computed_ids)` (`KVCache.allocate` / `free`)."""

    def __init__(self, config: SchedulerConfig,
                 allocate: Callable[[SeqOf[int], Mapping[int, tuple[SeqOf[int], int]]], tuple[int, int]],
                 release: Callable[[int, SeqOf[int]], None]) -> None:
        self.config = config
        self._allocate = allocate
        self._release = release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reused_tokens = 0  # prompt tokens not computed again, their K/V found in a freed or running slot

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """The (sequence, number of new tokens) pairs to run in the next forward pass."""
        budget = self.config.max_tokens_per_step
        batch: list[tuple[Sequence, int]] = []
        # Decoding sequences first: a long prefill must never stall the running streams.
        for seq in sorted(self.running, key=lambda s: s.num_pending > 1):
            n = min(seq.num_pending, budget)
            if n:
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget and len(self.running) < self.config.max_batch_size:
            seq = self.waiting[0]
            encoder = seq.num_encoder_pending
            n = seq.num_pending if seq.whole_prompt else min(seq.num_pending, budget)
            whole = encoder or seq.whole_prompt
            if whole and n + encoder > budget and any(k > 1 or s.num_encoder_pending for s, k in batch):
                break
            self.waiting.popleft()
            if self._reuses(seq):
                sources = {s.slot: (s.token_ids, s.num_computed) for s in self.running if s.caches_prefix}
                seq.slot, reused = self._allocate(seq.token_ids, sources)
            else:
                seq.slot, reused = self._allocate((), {})
            if reused:
                seq.num_computed = seq.num_cached_tokens = reused
                self.reused_tokens += reused
                n = min(seq.num_pending, budget)
            self.running.append(seq)
            batch.append((seq, n))
            budget = max(budget - n - encoder, 0)
        # what the budget has left goes to speculative decoding's drafts (`Sequence.draft`), after all else
        for i, (seq, n) in enumerate(batch):
            extra = min(len(seq.draft), budget) if n == seq.num_pending == 1 else 0
            if extra:
                batch[i] = (seq, n + extra)
                budget -= extra
        return batch

    def _reuses(self, seq: Sequence) -> bool:
        """Whether `seq` may start from another sequence's keys and values: decoder-only, read left to right, and
        not needing every prompt token computed (`Sequence.needs_every_prompt_token`)."""
        return self.config.prefix_caching and seq.caches_prefix and not seq.needs_every_prompt_token

    def remove(self, seq: Sequence) -> None:
        """Take a finished or cancelled sequence out, freeing its slot (with the tokens it computed, which a
        later prompt may reuse)."""
        if seq in self.running:
            self.running.remove(seq)
            computed = seq.token_ids[: seq.num_computed] if self.config.prefix_caching and seq.caches_prefix else ()
            self._release(seq.slot, computed)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
