"""Sliding-window layers keep ring caches (their window plus a step's chunk, not the whole context): outputs are
those of transformers and of an engine whose caches hold every position."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tests.conftest import save_tiny_model
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.kv_cache import KVCache
from vramlite.engine.loader import kv_cache_bytes

VOCAB = 512
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
CASES = {
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**SMALL, num_hidden_layers=2, sliding_window=7)),
    # sliding layers with a ring beside a full one, each with its own rope
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**SMALL, num_hidden_layers=3, head_dim=16,
                                                                 sliding_window=6, sliding_window_pattern=3)),
}
BUDGET = 4  # tokens per step: rings of window + 3 positions
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory, spm_tokenizer_dir):
    torch.manual_seed(0)
    hf = CASES[request.param]().eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return hf, save_tiny_model(hf, tmp_path_factory.mktemp(request.param), spm_tokenizer_dir)


def ringed(model_dir, **kwargs) -> Engine:
    return Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=3, max_tokens_per_step=BUDGET,
                           **kwargs)


def test_sliding_layers_keep_rings_that_the_plan_counts(pair):
    _, model_dir = pair
    engine = ringed(model_dir)
    cache, cfg = engine.runner.cache, engine.config
    assert cache.lengths == [128 if w is None else w + BUDGET - 1 for w in cfg.layer_windows]
    assert cache.nbytes == kv_cache_bytes(cfg, 3, engine.context, torch.float32, BUDGET) < kv_cache_bytes(
        cfg, 3, engine.context, torch.float32)


def test_long_generations_match_transformers(pair):
    """Prompts longer than a ring, prefilled in chunks of the budget, then decoded far past it, batched."""
    hf, model_dir = pair
    engine = ringed(model_dir)
    prompts = [[1, *range(10, 30)], [1, 5, 9], [1, *range(200, 211)]]
    ours = [c.token_ids for c in engine.generate_batch(prompts, GREEDY)]
    with torch.inference_mode():
        for prompt, got in zip(prompts, ours, strict=True):
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False,
                               pad_token_id=0, suppress_tokens=None)[0, len(prompt):].tolist()
            assert got == want


def test_prefix_reuse_only_where_the_ring_still_holds_what_is_needed(pair):
    """A next turn continues its slot's ring; a prompt that branches off well before the slot's end cannot reuse
    it (its ring moved on), and computes everything: both as an engine without rings answers."""
    _, model_dir = pair
    engine, whole = ringed(model_dir), Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    first = [1, *range(40, 60)]
    reply = engine.generate(first, GREEDY).token_ids
    turn = [*first, *reply, 7, 8, 9]
    before = engine.scheduler.reused_tokens
    assert engine.generate(turn, GREEDY).token_ids == whole.generate(turn, GREEDY).token_ids
    assert engine.scheduler.reused_tokens - before == len(first) + len(reply) - 1
    branch = [*first, 99, 98]  # shares 21 tokens with the slot's 60 + 43: far more than the slack behind
    before = engine.scheduler.reused_tokens
    assert engine.generate(branch, GREEDY).token_ids == whole.generate(branch, GREEDY).token_ids
    assert engine.scheduler.reused_tokens == before


def test_reuse_rules_of_a_ring_cache():
    kv = KVCache(2, 1, 64, 1, 2, torch.float32, torch.device("cpu"), windows=(8, None), max_chunk=4)
    assert kv.lengths == [11, 64]
    kv.free(kv.allocate()[0], list(range(30)))
    assert kv.allocate([*range(26), 99]) == (0, 0)  # 30 - 26 = 4 behind: more than the slack of 3
    kv.free(0, list(range(30)))
    assert kv.allocate([*range(27), 99]) == (0, 27)  # 3 behind: its windows are still in the ring
