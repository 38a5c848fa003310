"""Prefix caching: a freed KV cache slot keeps the keys and values of the tokens its sequence computed, and a
prompt that starts with them reuses them. Outputs must be those of an engine that computes everything."""

from __future__ import annotations

import pytest

from tests.conftest import save_tiny_llama
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.kv_cache import KVCache

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)


def cache(slots: int = 3) -> KVCache:
    import torch

    return KVCache(1, slots, 16, 1, 2, torch.float32, torch.device("cpu"))


def test_a_slot_is_taken_for_its_longest_prefix_then_empty_then_oldest():
    kv = cache()
    a, b, c = (kv.allocate()[0] for _ in range(3))
    assert (a, b, c) == (0, 1, 2)
    kv.free(b, [5, 6, 7, 8])
    kv.free(a, [5, 6, 9])
    assert kv.allocate([5, 6, 7, 1, 2]) == (1, 3)  # the longest common prefix
    assert kv.allocate([5, 6, 7, 8]) == (0, 2)  # slot 0's [5, 6]; all but the last token at most
    kv.free(0, [1, 2])
    kv.free(1)  # holds nothing
    kv.free(2, [3, 4])
    assert kv.allocate([9]) == (1, 0)  # no match: a slot that holds nothing
    assert kv.allocate([9]) == (0, 0)  # then the one freed longest ago, its tokens forgotten
    assert kv.allocate([1, 2, 3]) == (2, 0)
    with pytest.raises(RuntimeError):
        kv.allocate()


def test_a_prefix_a_running_sequence_holds_is_copied_into_a_slot_of_its_own():
    import torch

    kv = cache(4)
    assert [kv.allocate()[0] for _ in range(2)] == [0, 1]
    for layer in (*kv.k, *kv.v):
        layer[1] = torch.randn_like(layer[1])
    kv.free(0, [5, 6])  # a free slot holding a shorter prefix than the running one's
    running = {1: ([5, 6, 7, 8, 9, 3], 5)}  # slot 1: 6 tokens, the last not computed yet
    assert kv.allocate([5, 6, 7, 8, 9, 3, 4], running) == (2, 5)  # the computed ones, into an empty slot
    for layer in (*kv.k, *kv.v):
        assert torch.equal(layer[2, :, :5], layer[1, :, :5])
    assert kv.allocate([5, 6, 7], running) == (0, 2)  # no better than the free slot 0: taken in place
    kv.free(0, [1])
    assert kv.allocate([9, 9], running) == (3, 0)  # no match anywhere


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), spm_tokenizer_dir, max_position_embeddings=256)


@pytest.fixture(scope="module")
def engines(model_dir):
    kwargs = dict(device="cpu", dtype="fp32", max_batch_size=2, max_tokens_per_step=16, context=256)
    return Engine.from_dir(model_dir, **kwargs), Engine.from_dir(model_dir, prefix_caching=False, **kwargs)


def computed_tokens(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of tokens each forward pass computes, recorded from now on."""
    sizes: list[int] = []
    forward = engine.runner.forward

    def spy(chunks, **kwargs):
        sizes.append(sum(len(c.token_ids) for c in chunks))
        return forward(chunks, **kwargs)

    monkeypatch.setattr(engine.runner, "forward", spy)
    return sizes


def same(a, b) -> None:
    assert a.token_ids == b.token_ids and a.text == b.text
    assert [x.chosen.logprob for x in a.logprobs] == pytest.approx([x.chosen.logprob for x in b.logprobs], abs=1e-5)


def test_a_conversation_computes_only_its_new_tokens(engines, monkeypatch):
    cached, fresh = engines
    sizes = computed_tokens(cached, monkeypatch)
    history = cached.encode("The quick brown fox jumps over the lazy dog.")
    previous = 0  # what the last turn left in its slot: its prompt and answer, less the answer's last token
    for turn in range(3):
        before = cached.scheduler.reused_tokens
        sizes.clear()
        got, want = cached.generate(history, GREEDY), fresh.generate(history, GREEDY)
        same(got, want)
        reused = cached.scheduler.reused_tokens - before
        assert sum(sizes) == len(history) - reused + GREEDY.max_tokens - 1
        assert reused >= previous
        previous = len(history) + len(got.token_ids) - 1
        history = history + got.token_ids + cached.tokenizer.encode(f" and then {turn}", add_special_tokens=False)


def test_a_batch_sharing_a_prefix_gets_what_each_would_alone(engines):
    cached, fresh = engines
    common = cached.encode("Once upon a time, in a land far away,")
    cached.generate(common, GREEDY)  # leaves a slot holding the common prefix
    prompts = [common + cached.tokenizer.encode(" there lived", add_special_tokens=False), common[:5], common]
    for got, want in zip(cached.generate_batch(prompts, GREEDY), fresh.generate_batch(prompts, GREEDY),
                         strict=True):
        same(got, want)


def test_no_reuse_where_the_prompt_must_be_scored_or_caching_is_off(engines, monkeypatch):
    cached, fresh = engines
    prompt = cached.encode("Scored prompts are computed whole.")
    cached.generate(prompt, GREEDY)
    sizes = computed_tokens(cached, monkeypatch)
    scored = cached.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert sum(sizes) == len(prompt) and len(scored.prompt_logprobs) == len(prompt)
    fresh.generate(prompt, GREEDY)
    fresh.generate(prompt, GREEDY)
    assert fresh.scheduler.reused_tokens == 0


def test_a_request_sharing_a_running_ones_prompt_copies_its_keys_and_values(engines, monkeypatch):
    """Two users with one system prompt: the second arrives while the first decodes, and computes only its
    own tokens; both get what an engine without caching gives each."""
    cached, fresh = engines
    system = cached.encode("You are a helpful assistant who answers briefly and politely.")
    first, second = (system + cached.tokenizer.encode(q, add_special_tokens=False) for q in (" Hi!", " Why?"))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    a = cached.add_request(first, params)
    while cached.sequence(a).num_output_tokens < 2:
        cached.step()
    before = cached.scheduler.reused_tokens
    sizes = computed_tokens(cached, monkeypatch)
    b = cached.add_request(second, params)
    seqs = [cached.sequence(a), cached.sequence(b)]
    while not all(seq.finished for seq in seqs):
        cached.step()
    reused = cached.scheduler.reused_tokens - before
    assert reused == len(system)  # the common prefix, held by a slot that is not free
    assert sum(sizes) == len(second) - reused + (params.max_tokens - 1) + (params.max_tokens - 2)
    for seq, prompt in zip(seqs, (first, second), strict=True):
        want = fresh.generate(prompt, params)
        assert seq.output_ids == want.token_ids
        assert [x.chosen.logprob for x in seq.logprobs] == pytest.approx(
            [x.chosen.logprob for x in want.logprobs], abs=1e-5)
