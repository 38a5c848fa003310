"""Each family against transformers on tiny random configs: logits, greedy tokens, batching."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tests.conftest import save_tiny_model
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.loader import load_model
from vramlite.engine.runner import Chunk, ModelRunner

VOCAB = 512
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def phi3_longrope(**kwargs) -> tf.Phi3Config:
    """A phi3 config with LongRoPE factors for its 12 rotated dimensions of 16."""
    return tf.Phi3Config(**LLAMA, pad_token_id=0, partial_rotary_factor=0.75, **kwargs,
                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7, 2.0, 2.5],
                                       "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 13.0]})


CASES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)),
    "llama-tied-mha-bias-headdim": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **{**LLAMA, "num_key_value_heads": 4}, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
        head_dim=24)),
    "llama-rope-linear": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5000.0)),
    "llama-rope-llama3": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **LLAMA, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama-rope-yarn": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **LLAMA, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-rope-dynamic": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        **LLAMA, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**LLAMA, sliding_window=None)),
    # windows narrower than the tests' sequences (prompts of 5 to 20 tokens, 32 tokens in all), in every layer or
    # from max_window_layers on
    "mistral-sliding": lambda: tf.MistralForCausalLM(tf.MistralConfig(**LLAMA, sliding_window=7)),
    "qwen2-sliding-layer-1": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        **LLAMA, use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**LLAMA, tie_word_embeddings=True)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**LLAMA, head_dim=24, tie_word_embeddings=True)),
    # phi3-mini-128k's rope, its long factors (the cache reaches past the original 4 positions, and so do all the
    # tests' sequences); phi-4-mini's partial rotary factor
    "phi3-longrope-partial": lambda: tf.Phi3ForCausalLM(phi3_longrope(original_max_position_embeddings=4)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**LLAMA, pad_token_id=0, tie_word_embeddings=True)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**LLAMA, head_dim=24)),
    # softcapped scores and logits (small caps, so that they bite), query_pre_attn_scalar, windows in every other
    # layer
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **{**LLAMA, "num_hidden_layers": 3}, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
        attn_logit_softcapping=0.05, final_logit_softcapping=0.2)),
    # q/k norms; sliding layers with their own rope base, full ones with linear scaling
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **{**LLAMA, "num_hidden_layers": 3}, head_dim=16, sliding_window=6, sliding_window_pattern=3,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                      n_positions=256, bos_token_id=1, eos_token_id=2)),
}
PROMPT, DECODE = 12, 20

@pytest.fixture(scope="module", params=list(CASES))
def model_pair(request, tmp_path_factory, spm_tokenizer_dir):
    """(transformers model, directory holding it in HF format) for one case."""
    torch.manual_seed(0)
    hf = CASES[request.param]().eval()
    with torch.no_grad():  # transformers starts norms at 1 and biases at 0: move them so that loading them counts
        for param in hf.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    out = tmp_path_factory.mktemp(request.param)
    return hf, save_tiny_model(hf, out, spm_tokenizer_dir)


@torch.inference_mode()
def test_prefill_and_decode_logits_match_transformers(model_pair):
    hf, model_dir = model_pair
    model, context = load_model(model_dir, torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, num_slots=3, context=context)
    ids = torch.randint(3, VOCAB, (1, PROMPT + DECODE), generator=torch.Generator().manual_seed(1))
    ref = hf(ids).logits[0]
    tokens = ids[0].tolist()
    prefill = runner.forward_all([Chunk(2, tokens[:PROMPT], 0)])[0]
    torch.testing.assert_close(prefill, ref[:PROMPT], atol=1e-4, rtol=0)
    for t in range(PROMPT, PROMPT + DECODE):
        step = runner.forward([Chunk(2, [tokens[t]], t)])[0]
        torch.testing.assert_close(step, ref[t], atol=1e-4, rtol=0)


@torch.inference_mode()
def test_chunked_prefill_equals_whole_prefill(model_pair):
    hf, model_dir = model_pair
    model, context = load_model(model_dir, torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, num_slots=2, context=context)
    tokens = list(range(5, 5 + 17))
    ref = hf(torch.tensor([tokens])).logits[0]
    pieces = [runner.forward_all([Chunk(0, tokens[a:b], a)])[0] for a, b in ((0, 7), (7, 8), (8, 17))]
    torch.testing.assert_close(torch.cat(pieces), ref, atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(model_pair):
    hf, model_dir = model_pair
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=2)
    prompt = [1, 17, 42, 99, 7]
    ours = engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0, suppress_tokens=None)
    assert ours.token_ids == ref[0, len(prompt):].tolist()
    assert ours.completion_tokens == 32 and ours.prompt_tokens == len(prompt)
    assert ours.finish_reason.value == "length"


def test_a_prompt_continuing_a_finished_one_reuses_its_cache_and_matches_transformers(model_pair):
    """Prefix caching in each family: the keys and values of a finished sequence's prompt and of the tokens it
    generated (computed one by one in decode steps) serve a longer prompt that starts with them."""
    hf, model_dir = model_pair
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    first = engine.generate([1, 17, 42, 99, 7], greedy)
    prompt = [1, 17, 42, 99, 7, *first.token_ids, 123, 45]
    before = engine.scheduler.reused_tokens
    ours = engine.generate(prompt, greedy)
    assert engine.scheduler.reused_tokens - before == 5 + 15  # the first prompt and all its tokens but the last
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          pad_token_id=0, suppress_tokens=None)
    assert ours.token_ids == ref[0, len(prompt):].tolist()


def test_batch_of_different_lengths_matches_each_alone(model_pair):
    _, model_dir = model_pair
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=4)
    prompts = [[1, 5, 9], [1, *range(20, 40)], [1, 200, 201, 202, 203, 204, 205], [1, 300]]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_k=50, seed=123, ignore_eos=True)
    for params in (greedy, sampled):
        alone = [engine.generate(p, params).token_ids for p in prompts]
        together = [c.token_ids for c in engine.generate_batch(prompts, params)]
        assert together == alone


def test_embeddings_pool_transformers_last_hidden_state(model_pair):
    """Each pooling of each family, over prompts prefilled in chunks of 8 tokens and batched together, against
    transformers' base model's `last_hidden_state` (after the final norm), pooled and L2-normalized."""
    hf, model_dir = model_pair
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=3, max_tokens_per_step=8)
    prompts = [[1, 5, 9, 11, 13], [1, *range(20, 40)], [1, *range(200, 210)]]  # past phi3's original 4 positions
    with torch.inference_mode():
        states = [hf.base_model(torch.tensor([p])).last_hidden_state[0] for p in prompts]
    for pooling, pool in (("last", lambda h: h[-1]), ("mean", lambda h: h.mean(dim=0)), ("first", lambda h: h[0])):
        ours = torch.tensor(engine.embed(prompts, pooling))
        ref = torch.nn.functional.normalize(torch.stack([pool(h) for h in states]), dim=-1)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)


@torch.inference_mode()
def test_phi3_longrope_keeps_its_short_factors_in_a_context_within_the_original(tmp_path, spm_tokenizer_dir):
    """As transformers for a sequence that has not outgrown the original context; a longer cache takes the long
    factors for every position (the CASES entry checks those)."""
    torch.manual_seed(0)
    hf = tf.Phi3ForCausalLM(phi3_longrope(original_max_position_embeddings=32)).eval()
    model_dir = save_tiny_model(hf, tmp_path, spm_tokenizer_dir)
    tokens = list(range(7, 39))
    ref = hf(torch.tensor([tokens])).logits[0]
    logits = {}
    for context in (32, 33):
        model, _ = load_model(model_dir, torch.device("cpu"), torch.float32, context=context)
        runner = ModelRunner(model, torch.device("cpu"), torch.float32, num_slots=1, context=context)
        logits[context] = runner.forward_all([Chunk(0, tokens, 0)])[0]
    torch.testing.assert_close(logits[32], ref, atol=1e-4, rtol=0)
    assert (logits[33] - ref).abs().max() > 1e-3


@torch.inference_mode()
def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path, spm_tokenizer_dir):
    """Gemma 3 from 4B up ships as a vision-language checkpoint: its text_config (written, as on the hub, with
    only what differs from transformers' defaults, and the rope in the older format) and its language model's
    weights are read; the vision tower is not."""
    import json

    from vramlite.engine.models.gemma import GEMMA3_TEXT_DEFAULTS

    defaults = tf.Gemma3TextConfig()
    older_names = {"rope_theta": defaults.rope_parameters["full_attention"]["rope_theta"],
                   "rope_local_base_freq": defaults.rope_parameters["sliding_attention"]["rope_theta"],
                   "sliding_window_pattern": defaults._sliding_window_pattern}
    transformers_defaults = {k: older_names[k] if k in older_names else getattr(defaults, k)
                             for k in GEMMA3_TEXT_DEFAULTS}
    assert transformers_defaults == GEMMA3_TEXT_DEFAULTS

    torch.manual_seed(0)
    text = tf.Gemma3TextConfig(**{**LLAMA, "num_hidden_layers": 6}, head_dim=16, sliding_window=6,
                               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 1_000_000.0},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)
    hf = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=text, vision_config=vision,
                                                           mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model_dir = save_tiny_model(hf, tmp_path, spm_tokenizer_dir)
    config = json.loads((model_dir / "config.json").read_text())
    written = config["text_config"]
    config["text_config"] = {"model_type": "gemma3_text", "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                             **{k: v for k, v in written.items() if k in LLAMA and GEMMA3_TEXT_DEFAULTS.get(k) != v},
                             "head_dim": 16, "sliding_window": 6}
    (model_dir / "config.json").write_text(json.dumps(config))

    model, context = load_model(model_dir, torch.device("cpu"), torch.float32)
    assert model.config.layer_windows == (6, 6, 6, 6, 6, None)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, num_slots=1, context=context)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(runner.forward_all([Chunk(0, ids[0].tolist(), 0)])[0], hf(input_ids=ids).logits[0],
                               atol=1e-4, rtol=0)
