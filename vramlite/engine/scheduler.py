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
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from vramlite.engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    """`max_batch_size` sequences at once (KV cache slots); `max_tokens_per_step` tokens per forward."""

    max_batch_size: int = 8
    max_tokens_per_step: int = 512

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be ≥ 1, got {self.max_batch_size}")
        if self.max_tokens_per_step < self.max_batch_size:
            raise ValueError(f"max_tokens_per_step ({self.max_tokens_per_step}) must be ≥ max_batch_size "
                             f"({self.max_batch_size}) so every running sequence can decode each step")


class Scheduler:
    """Waiting queue + running set; slots come from `allocate` / go back through `release`."""

    def __init__(self, config: SchedulerConfig, allocate: Callable[[], int], release: Callable[[int], None]
                 ) -> None:
        self.config = config
        self._allocate = allocate
        self._release = release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

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
            seq.slot = self._allocate()
            self.running.append(seq)
            batch.append((seq, n))
            budget = max(budget - n - encoder, 0)
        return batch

    def remove(self, seq: Sequence) -> None:
        """Take a finished or cancelled sequence out, freeing its slot."""
        if seq in self.running:
            self.running.remove(seq)
            self._release(seq.slot)
            seq.slot = None
        elif seq in self.waiting:
            self.waiting.remove(seq)
