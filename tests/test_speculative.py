"""Speculative decoding by prompt lookup: drafts from the sequence's own n-grams, verified in one forward pass.
A speculating engine's greedy output is the plain engine's, token for token."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tests.conftest import save_tiny_llama, save_tiny_model
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.speculative import NgramIndex, accepted, sampled

GREEDY = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)


def test_a_draft_is_what_followed_the_longest_suffix_seen_before():
    index = NgramIndex()
    ids = [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 1, 2, 3]
    assert index.draft(ids, 3) == [4, 9, 2]  # the longest suffix seen before, "1 2 3", came before 4 9 2
    assert index.draft([*ids, 4, 9, 2, 3], 3) == [5, 6, 7]  # "9 2 3" and "2 3" last came before 5 6 7
    assert index.draft(ids, 0) == []
    assert NgramIndex().draft([1, 2, 3], 4) == []  # no earlier occurrence
    assert NgramIndex().draft([8, 8, 8, 8], 4) == [8]  # what followed, up to the end


def test_draft_length_follows_how_the_last_draft_fared():
    index, ids = NgramIndex(), [7, 8, 1, 2, 3, 4, 5, 6, 9, 1, 2]
    assert index.draft(ids, 4) == [3, 4, 5, 6]
    index.verified(4, 0)  # missed at once: a one-token probe next
    assert index.draft(ids, 4) == [3]
    index.verified(1, 1)  # kept: twice as long
    assert index.draft(ids, 4) == [3, 4]
    index.verified(2, 1)  # kept 1 of 2: one longer than that
    assert index.draft(ids, 4) == [3, 4]


def test_accepted_keeps_the_draft_up_to_its_first_miss_then_the_models_token():
    assert accepted([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert accepted([5, 9, 7, 8], [5, 6, 7]) == [5, 9]
    assert accepted([4, 6, 7, 8], [5, 6, 7]) == [4]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), spm_tokenizer_dir, max_position_embeddings=256)


@pytest.fixture(scope="module")
def engines(llama_dir):
    kwargs = dict(device="cpu", dtype="fp32", max_batch_size=3, max_tokens_per_step=16)
    return (Engine.from_dir(llama_dir, speculative_tokens=5, speculative_max_batch=3, **kwargs),
            Engine.from_dir(llama_dir, **kwargs))


PROMPTS = [[1, *range(10, 30), *range(10, 30)], [1, 5, 9, 5, 9], [1, *range(200, 230)]]


def test_greedy_output_is_the_plain_engines_and_drafts_are_accepted(engines):
    fast, plain = engines
    before = fast.accepted_tokens
    for got, want in zip(fast.generate_batch(PROMPTS, GREEDY), plain.generate_batch(PROMPTS, GREEDY), strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == want.finish_reason and got.completion_tokens == 48
    assert fast.accepted_tokens - before > 10  # a random model's greedy output loops: drafts find it


def test_drafts_only_while_at_most_speculative_max_batch_sequences_run(llama_dir):
    """By default (1), a batch decodes without drafts, and a request alone drafts."""
    fast = Engine.from_dir(llama_dir, device="cpu", dtype="fp32", max_batch_size=3, speculative_tokens=5)
    fast.generate_batch(PROMPTS, GREEDY)
    assert fast.drafted_tokens == 0
    fast.generate(PROMPTS[0], GREEDY)
    assert fast.drafted_tokens > 0


def test_stops_land_where_they_would_without_drafts(engines):
    fast, plain = engines
    prompt = PROMPTS[0]
    text = plain.generate(prompt, GREEDY).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for params in (SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, stop=[stop])):
        got, want = fast.generate(prompt, params), plain.generate(prompt, params)
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)


def test_penalized_scored_or_structured_requests_do_not_speculate(engines):
    fast, _ = engines
    for params in (SamplingParams(max_tokens=8, temperature=0, repetition_penalty=1.2),
                   SamplingParams(max_tokens=8, temperature=0, logprobs=1),
                   SamplingParams(max_tokens=8, temperature=0, regex="[a-z]+")):
        before = fast.drafted_tokens
        fast.generate(PROMPTS[0], params)
        assert fast.drafted_tokens == before


def test_sampled_requests_speculate_and_repeat_with_their_seed(engines):
    fast, _ = engines
    # a temperature so low that the draws follow the greedy text, whose repeats drafts find; yet sampled
    params = SamplingParams(max_tokens=48, temperature=0.01, top_k=20, seed=5, ignore_eos=True)
    before = fast.drafted_tokens, fast.accepted_tokens
    first = fast.generate(PROMPTS[0], params).token_ids
    assert fast.drafted_tokens > before[0] and fast.accepted_tokens > before[1]
    assert fast.generate(PROMPTS[0], params).token_ids == first and len(first) == 48


def test_speculative_sampling_keeps_the_distribution():
    """Each position's token follows its row's distribution, whether the draft was kept or not."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.7], [0.25, 0.25, 0.25, 0.25]])
    generator = torch.Generator().manual_seed(0)
    runs = [sampled(probs, [1, 3], generator) for _ in range(20000)]
    first = torch.bincount(torch.tensor([r[0] for r in runs]), minlength=4) / len(runs)
    torch.testing.assert_close(first, probs[0], atol=0.015, rtol=0)
    after_kept = [r[1] for r in runs if r[0] == 1]
    second = torch.bincount(torch.tensor(after_kept), minlength=4) / len(after_kept)
    torch.testing.assert_close(second, probs[1], atol=0.02, rtol=0)
    assert all(len(r) == 3 for r in runs if r[:2] == [1, 3]) and all(len(r) == 1 for r in runs if r[0] != 1)


def test_sliding_window_rings_under_drafts(tmp_path, spm_tokenizer_dir):
    """Drafted positions a ring takes and a rejection leaves behind are overwritten before any query sees them."""
    torch.manual_seed(0)
    hf = tf.MistralForCausalLM(tf.MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=128, sliding_window=6)).eval()
    model_dir = save_tiny_model(hf, tmp_path, spm_tokenizer_dir)
    kwargs = dict(device="cpu", dtype="fp32", max_batch_size=2, max_tokens_per_step=6)
    fast = Engine.from_dir(model_dir, speculative_tokens=4, speculative_max_batch=2, **kwargs)
    plain = Engine.from_dir(model_dir, **kwargs)
    assert min(fast.runner.cache.lengths) < fast.context
    prompts = PROMPTS[:2]
    for got, want in zip(fast.generate_batch(prompts, GREEDY), plain.generate_batch(prompts, GREEDY), strict=True):
        assert got.token_ids == want.token_ids
    assert fast.accepted_tokens > 0
