"""A forward pass that fails (an exception, CUDA out of memory) ends only the requests it must, and frees them.

Faults are injected for real into the runner's forward pass; everything around it is the production path.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import save_tiny_llama
from vramlite.engine import Engine, FinishReason, SamplingParams

POISON = 300  # a token id whose presence in a chunk makes the forward pass raise
SAMPLED = SamplingParams(max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory, spm_tokenizer_dir):
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("llama"), spm_tokenizer_dir, max_position_embeddings=128)
    return Engine.from_dir(model_dir, device="cpu", max_batch_size=3)


@pytest.fixture
def faulty(engine, monkeypatch):
    """Make the forward pass raise for a chunk holding POISON; returns the list of forward-pass sizes seen."""
    forward = engine.runner.forward
    calls: list[int] = []

    def poisoned(chunks, **kwargs):
        calls.append(len(chunks))
        if any(POISON in c.token_ids for c in chunks):
            raise RuntimeError("injected fault")
        return forward(chunks, **kwargs)

    monkeypatch.setattr(engine.runner, "forward", poisoned)
    return calls


def run(engine: Engine, ids: list[int]) -> dict[int, list]:
    outs: dict[int, list] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.seq_id].append(out)
    return outs


def test_a_failing_request_ends_with_an_error_and_the_batch_goes_on(engine, faulty, caplog):
    prompts = [[5, 6, 7, 8], [9, POISON, 11], [12, 13]]
    alone = [engine.generate(p, SAMPLED).token_ids for p in (prompts[0], prompts[2])]
    faulty.clear()
    with caplog.at_level(logging.ERROR, logger="vramlite.engine"):
        ids = [engine.add_request(p, SAMPLED) for p in prompts]
        outs = run(engine, ids)
    bad = outs[ids[1]]
    assert len(bad) == 1 and bad[0].finish_reason is FinishReason.ERROR
    assert bad[0].error == "RuntimeError: injected fault" and bad[0].token_id is None
    for i, expected in zip((ids[0], ids[2]), alone, strict=True):
        assert [o.token_id for o in outs[i]] == expected  # same tokens as without the fault, seeds included
        assert outs[i][-1].finish_reason is FinishReason.LENGTH
    assert faulty[:4] == [3, 1, 1, 1]  # the batch, then each sequence alone
    assert engine.runner.cache.num_free_slots == 3 and not engine.has_unfinished()
    assert "event=step_failed" in caplog.text and f"event=sequence_failed seq_id={ids[1]}" in caplog.text


def test_a_fault_that_passes_on_retry_loses_nothing(engine, monkeypatch):
    """An out-of-memory of the whole batch: each sequence alone fits, so nobody sees an error."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    alone = [engine.generate(p, SAMPLED).token_ids for p in prompts]
    forward = engine.runner.forward
    failed = []

    def oom_once(chunks, **kwargs):
        if len(chunks) == 3 and not failed:
            failed.append(True)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(chunks, **kwargs)

    monkeypatch.setattr(engine.runner, "forward", oom_once)
    ids = [engine.add_request(p, SAMPLED) for p in prompts]
    outs = run(engine, ids)
    assert failed
    assert [[o.token_id for o in outs[i]] for i in ids] == alone
    assert all(outs[i][-1].finish_reason is FinishReason.LENGTH for i in ids)


def test_a_fault_mid_decode_frees_the_slot(engine, faulty):
    """The poison token is generated, not prompted: the sequence fails on its next step."""
    seq_id = engine.add_request([5, 6], SAMPLED)
    engine.step()
    engine.sequence(seq_id).token_ids.append(POISON)  # as if sampled: its decode chunk now holds POISON
    engine.sequence(seq_id).num_computed += 1
    outs = run(engine, [seq_id])
    assert outs[seq_id][-1].finish_reason is FinishReason.ERROR
    assert engine.runner.cache.num_free_slots == 3
    assert engine.generate([5, 6], SAMPLED).finish_reason is FinishReason.LENGTH  # the engine serves on
