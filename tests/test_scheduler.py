"""The continuous-batching scheduler's choices, step by step, on sequences reduced to what it reads.

The engine tests run the same scheduler with real sequences and a real model; these pin its rules."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from vramlite.engine.scheduler import Scheduler, SchedulerConfig


@dataclass(eq=False)
class Seq:
    """What the scheduler reads of an `engine.sequence.Sequence`."""

    name: str
    num_pending: int
    num_encoder_pending: int = 0
    whole_prompt: bool = False
    slot: int | None = None
    draft: list[int] = field(default_factory=list)


def make(batch: int, budget: int) -> tuple[Scheduler, list[int]]:
    free = list(range(batch))
    # prefix caching off: these sequences hold no tokens (the KV cache's and the engine's tests cover it)
    return Scheduler(SchedulerConfig(batch, budget, prefix_caching=False), lambda ids, running: (free.pop(0), 0),
                     lambda slot, computed: free.append(slot)), free


def run(scheduler: Scheduler) -> list[tuple[str, int]]:
    """One step: what is scheduled, then each sequence as if its tokens ran (a finished prompt decodes)."""
    batch = scheduler.schedule()
    for seq, n in batch:
        seq.num_pending = max(seq.num_pending - n, 0) or 1  # drafted tokens run too: then one is pending
        seq.num_encoder_pending = 0
    return [(seq.name, n) for seq, n in batch]


def test_decoding_sequences_go_first_and_a_long_prompt_is_prefilled_in_pieces():
    scheduler, _ = make(batch=4, budget=8)
    a = Seq("a", 3)
    scheduler.add(a)
    assert run(scheduler) == [("a", 3)]
    scheduler.add(Seq("b", 20))
    assert run(scheduler) == [("a", 1), ("b", 7)]
    assert run(scheduler) == [("a", 1), ("b", 7)]
    assert run(scheduler) == [("a", 1), ("b", 6)]
    assert run(scheduler) == [("a", 1), ("b", 1)]


def test_drafts_take_what_the_budget_leaves_after_decodes_and_prefills():
    scheduler, _ = make(batch=4, budget=8)
    a, b = Seq("a", 2), Seq("b", 1)
    scheduler.add(a)
    assert run(scheduler) == [("a", 2)]
    a.draft = [7] * 9
    assert run(scheduler) == [("a", 8)]  # 1 + 7 drafted: the budget
    scheduler.add(Seq("c", 20))
    assert run(scheduler) == [("a", 1), ("c", 7)]  # a prompt waiting: its prefill first
    scheduler.add(b)
    b.draft = [5, 5]
    assert run(scheduler) == [("a", 1), ("c", 7)]
    assert run(scheduler) == [("a", 1), ("c", 6), ("b", 1)]  # b's prompt: not drafted after
    assert run(scheduler) == [("a", 6), ("c", 1), ("b", 1)]  # 5 left, to the first drafts in the batch
    a.draft = [7]
    assert run(scheduler) == [("a", 2), ("c", 1), ("b", 3)]


def test_waiting_sequences_are_admitted_in_order_while_slots_last():
    scheduler, free = make(batch=2, budget=64)
    for name in "abc":
        scheduler.add(Seq(name, 4))
    assert run(scheduler) == [("a", 4), ("b", 4)]
    assert free == [] and [s.name for s in scheduler.waiting] == ["c"]
    a = scheduler.running[0]
    scheduler.remove(a)
    assert a.slot is None and free == [0]
    assert run(scheduler) == [("b", 1), ("c", 4)]
    assert scheduler.running[-1].slot == 0


def test_removing_a_waiting_sequence_takes_no_slot():
    scheduler, free = make(batch=1, budget=8)
    a, b = Seq("a", 2), Seq("b", 2)
    scheduler.add(a)
    scheduler.add(b)
    run(scheduler)
    scheduler.remove(b)
    assert scheduler.num_unfinished == 1 and free == []
    scheduler.remove(a)
    assert scheduler.num_unfinished == 0 and free == [0]


@pytest.mark.parametrize("kind", ["whole_prompt", "encoder"])
def test_a_whole_input_waits_behind_a_prefill_but_runs_over_budget_beside_decodes(kind):
    scheduler, _ = make(batch=4, budget=8)

    def whole(name: str, n: int) -> Seq:
        return Seq(name, n, whole_prompt=True) if kind == "whole_prompt" else Seq(name, 1, num_encoder_pending=n)

    scheduler.add(Seq("a", 6))
    scheduler.add(whole("b", 5))
    assert run(scheduler) == [("a", 6)]  # b does not fit the 2 tokens left beside a's prefill
    scheduler.add(whole("c", 30))
    # Beside a's one decode token, b fits; c (30, over the budget) waits for a step with only decodes.
    expected_b = ("b", 5) if kind == "whole_prompt" else ("b", 1)
    assert run(scheduler) == [("a", 1), expected_b]
    expected_c = ("c", 30) if kind == "whole_prompt" else ("c", 1)
    assert run(scheduler) == [("a", 1), ("b", 1), expected_c]
    assert run(scheduler) == [("a", 1), ("b", 1), ("c", 1)]


def test_config_rejects_a_budget_smaller_than_the_batch():
    with pytest.raises(ValueError, match="max_tokens_per_step"):
        SchedulerConfig(max_batch_size=8, max_tokens_per_step=4)
    with pytest.raises(ValueError, match="max_batch_size"):
        SchedulerConfig(max_batch_size=0)
