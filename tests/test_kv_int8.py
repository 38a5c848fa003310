"""The int8 KV cache: keys and values in int8 with a scale per position and head, read back within half a
quantization step, counted by the memory plan, and giving logits close to a float cache's."""

from __future__ import annotations

import torch
import transformers as tf

from tests.conftest import save_tiny_llama, save_tiny_model
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.kv_cache import Int8Cache, KVCache
from vramlite.engine.loader import kv_cache_bytes


def test_values_come_back_within_half_a_step_of_their_scale():
    cache = Int8Cache((3, 2, 16, 8), torch.float32, torch.device("cpu"))
    values = torch.randn(5, 2, 8) * torch.tensor([0.01, 100.0]).view(1, 2, 1)  # heads of very different sizes
    values[0, 1] = 0  # an all-zero head: no division by zero
    slots, positions = torch.tensor([0, 0, 2, 2, 1]), torch.tensor([0, 1, 7, 15, 3])
    cache[slots, :, positions] = values
    back = cache[slots, :, positions]
    step = values.abs().amax(-1, keepdim=True) / 127
    assert back.shape == values.shape and torch.all((back - values).abs() <= step / 2 + 1e-7)
    assert torch.equal(back[0, 1], torch.zeros(8))
    assert cache[2, :, :16].shape == (2, 16, 8) and cache.shape == (3, 2, 16, 8)
    assert cache.nbytes == 3 * 2 * 16 * (8 + 4)


def test_a_copied_prefix_carries_its_scales():
    kv = KVCache(1, 2, 16, 2, 8, torch.float32, torch.device("cpu"), int8=True)
    assert kv.allocate()[0] == 0
    kv.k[0][0, :, :10] = torch.randn(2, 10, 8)
    assert kv.allocate(list(range(12)), {0: (list(range(12)), 10)}) == (1, 10)
    assert torch.equal(kv.k[0][1, :, :10], kv.k[0][0, :, :10])


def prompt_logprobs(engine: Engine, prompt: list[int]) -> torch.Tensor:
    scored = engine.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0)).prompt_logprobs
    return torch.tensor([entry.chosen.logprob for entry in scored[1:]])


def test_logits_stay_close_to_a_float_cache_and_the_plan_counts_it(tmp_path, spm_tokenizer_dir):
    """A LLaMA and a Gemma 3 whose sliding layers keep rings (budget 8), prefilled in chunks."""
    torch.manual_seed(0)
    gemma = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=6, sliding_window_pattern=3))
    for model_dir in (save_tiny_llama(tmp_path / "llama", spm_tokenizer_dir),
                      save_tiny_model(gemma, tmp_path / "gemma", spm_tokenizer_dir)):
        kwargs = dict(device="cpu", dtype="fp32", max_batch_size=2, max_tokens_per_step=8)
        plain, small = Engine.from_dir(model_dir, **kwargs), Engine.from_dir(model_dir, kv_cache_dtype="int8",
                                                                              **kwargs)
        prompt = [1, *range(30, 90)]
        diff = (prompt_logprobs(plain, prompt) - prompt_logprobs(small, prompt)).abs()
        assert 0 < diff.max() < 0.05, diff.max()
        cfg, context = small.config, small.context
        assert small.runner.cache.nbytes == kv_cache_bytes(cfg, 2, context, torch.float32, 8, kv_int8=True)
        # a byte a value and a 4-byte scale per head of head_dim values, where fp32 takes 4 bytes a value
        assert small.runner.cache.nbytes * 4 * cfg.head_dim == plain.runner.cache.nbytes * (cfg.head_dim + 4)
        greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
        agree = sum(a == b for a, b in zip(plain.generate(prompt, greedy).token_ids,
                                           small.generate(prompt, greedy).token_ids, strict=True))
        assert agree >= 20
