"""Attention and sampling paths on a CUDA GPU (run with `pytest -m gpu`; skipped without one): Gemma 2's capped
attention, SDPA's kernels, ring caches, the int8 KV cache, speculative decoding and structured output."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from tests.conftest import save_tiny_model
from tests.test_models import CASES
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.loader import load_model
from vramlite.engine.runner import Chunk, ModelRunner

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
PROMPT = [1, *range(30, 90)]


def saved(case: str, tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    hf = CASES[case]().eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return hf, save_tiny_model(hf, tmp_path / case, tokenizer_dir)


def scores(engine: Engine, prompt: list[int]) -> torch.Tensor:
    scored = engine.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0)).prompt_logprobs
    return torch.tensor([entry.chosen.logprob for entry in scored[1:]])


@torch.inference_mode()
def test_gemma2_capped_attention_in_fp16_matches_transformers(tmp_path, spm_tokenizer_dir):
    hf, model_dir = saved("gemma2", tmp_path, spm_tokenizer_dir)
    model, context = load_model(model_dir, CUDA, torch.float16)
    runner = ModelRunner(model, CUDA, torch.float16, num_slots=2, context=context)
    tokens = PROMPT[:32]
    ref = hf(torch.tensor([tokens])).logits[0]
    pieces = [runner.forward_all([Chunk(0, tokens[a:b], a)])[0] for a, b in ((0, 20), (20, 21), (21, 32))]
    torch.testing.assert_close(torch.cat(pieces).cpu(), ref, atol=2e-2, rtol=0)


@torch.inference_mode()
def test_decode_steps_of_one_sequence_never_run_cudnn_attention(tmp_path, spm_tokenizer_dir):
    """cuDNN's attention (recent torch's first choice on sm90/sm100) builds a graph, tens of ms of host time, for
    each new key length: every decode step of one sequence (`sdpa_backends`)."""
    from torch.profiler import ProfilerActivity, profile

    _, model_dir = saved("llama", tmp_path, spm_tokenizer_dir)
    model, context = load_model(model_dir, CUDA, torch.float16)
    runner = ModelRunner(model, CUDA, torch.float16, num_slots=1, context=context)
    runner.forward([Chunk(0, PROMPT[:8], 0)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for t in range(8, 12):
            runner.forward([Chunk(0, [PROMPT[t]], t)])
    ops = {event.key for event in prof.key_averages()}
    assert any("scaled_dot_product" in op for op in ops), sorted(ops)
    assert not any("cudnn" in op for op in ops), sorted(op for op in ops if "cudnn" in op)


def test_rings_and_the_int8_cache_on_the_gpu(tmp_path, spm_tokenizer_dir):
    torch.manual_seed(0)
    hf = tf.MistralForCausalLM(tf.MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=256, sliding_window=7))
    model_dir = save_tiny_model(hf, tmp_path / "mistral", spm_tokenizer_dir)
    kwargs = dict(device="cuda", dtype="fp16", max_batch_size=2)
    whole = Engine.from_dir(model_dir, **kwargs)
    ringed = Engine.from_dir(model_dir, max_tokens_per_step=4, **kwargs)
    small = Engine.from_dir(model_dir, max_tokens_per_step=4, kv_cache_dtype="int8", **kwargs)
    assert min(ringed.runner.cache.lengths) == 10 and type(small.runner.cache.k[0]).__name__ == "Int8Cache"
    reference = scores(whole, PROMPT)
    torch.testing.assert_close(scores(ringed, PROMPT), reference, atol=2e-2, rtol=0)
    torch.testing.assert_close(scores(small, PROMPT), reference, atol=0.1, rtol=0)


def test_speculative_and_structured_output_on_the_gpu(tmp_path, spm_tokenizer_dir):
    _, model_dir = saved("llama", tmp_path, spm_tokenizer_dir)
    fast = Engine.from_dir(model_dir, device="cuda", dtype="fp32", speculative_tokens=4, speculative_max_batch=2)
    plain = Engine.from_dir(model_dir, device="cuda", dtype="fp32")
    greedy = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    prompts = [PROMPT, [1, 5, 9, 5, 9]]
    assert [c.token_ids for c in fast.generate_batch(prompts, greedy)] == [
        c.token_ids for c in plain.generate_batch(prompts, greedy)]
    assert fast.accepted_tokens > 0
    pytest.importorskip("outlines_core")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    out = plain.generate("x", SamplingParams(max_tokens=20, temperature=1.0, seed=1, json_schema=schema))
    assert isinstance(json.loads(out.text)["ok"], bool)
