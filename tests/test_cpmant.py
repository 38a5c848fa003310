"""CPM-Ant against transformers' CpmAntForCausalLM on a tiny random config with a CPM `vocab.txt`: logits of the
prefill and of cached decode steps, greedy tokens, batching, a prompt longer than the step budget, int8, offload."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

pytest.importorskip("jieba")  # not on a GPU host with only the engine's packages: see conftest

from tests.conftest import save_tiny_model
from tests.test_cpm_tokenizer import write_vocab
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.cpm_tokenizer import CpmTokenizer
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.loader import kv_cache_bytes, load_model
from vramlite.engine.runner import Chunk, ModelRunner

CPU = torch.device("cpu")
PROMPT = [2, 40, 41, 42, 100, 230, 17, 305, 88, 9, 61]  # <s> then text ids
GREEDY = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cpmant(tmp_path_factory):
    """(transformers model, directory) for a tiny random CPM-Ant whose vocabulary is a CPM vocab.txt."""
    vocab_dir = write_vocab(tmp_path_factory.mktemp("cpmant-vocab"), {"tokenizer_class": "CpmAntTokenizer"})
    vocab_size = len((vocab_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())
    torch.manual_seed(0)
    config = tf.CpmAntConfig(vocab_size=vocab_size, hidden_size=32, num_attention_heads=4, dim_head=8, dim_ff=48,
                             num_hidden_layers=3, position_bias_num_buckets=32, position_bias_max_distance=64,
                             prompt_types=3, prompt_length=4, segment_types=4, init_std=0.3, dropout_p=0.0)
    hf = tf.CpmAntForCausalLM(config).eval()
    with torch.no_grad():  # norms near 1 but not 1, so a misplaced norm weight shows
        for name, param in hf.named_parameters():
            if "layernorm" in name:
                param.normal_(1.0, 0.1)
    return hf, save_tiny_model(hf, tmp_path_factory.mktemp("cpmant"), vocab_dir)


def reference_steps(hf, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """transformers' logits for the prompt (every position), then for each next token through its cache,
    passing the whole sequence each time as its `generate` does."""
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf(input_ids=ids, use_cache=True)
        logits, cache = [out.logits[0]], out.past_key_values
        for token in tokens:
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            out = hf(input_ids=ids, past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            cache = out.past_key_values
    return logits


def test_prefill_and_decode_logits_match_transformers(cpmant):
    hf, model_dir = cpmant
    model, context = load_model(model_dir, CPU, torch.float32)
    assert model.config.cache_prefix == 4 and model.config.whole_prompt
    runner = ModelRunner(model, CPU, torch.float32, num_slots=2, context=context)
    assert runner.cache.nbytes == kv_cache_bytes(model.config, 2, context, torch.float32)  # what the planner counts
    tokens = [7, 250, 31, 90, 400, 12, 5, 77, 300, 21, 64, 8, 199, 45, 3, 6, 500, 222, 101, 11]
    ref = reference_steps(hf, PROMPT, tokens)
    prefill = runner.forward_all([Chunk(1, PROMPT, 0)])[0]
    torch.testing.assert_close(prefill, ref[0], atol=1e-4, rtol=0)
    for t, token in enumerate(tokens):
        step = runner.forward([Chunk(1, [token], len(PROMPT) + t)])[0]
        torch.testing.assert_close(step, ref[t + 1], atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(cpmant):
    hf, model_dir = cpmant
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=2)
    ours = engine.generate(PROMPT, GREEDY)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.token_ids == ref[0, len(PROMPT) :].tolist()
    assert len(set(ours.token_ids)) > 3  # not one token repeated: the check means something


def test_a_one_token_prompt_matches_transformers(cpmant):
    """A one-token prompt is still a prefill: the model's prompt tokens go in front of it."""
    hf, model_dir = cpmant
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=2)
    ours = engine.generate([2], GREEDY)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[2]]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.token_ids == ref[0, 1:].tolist()
    assert len(set(ours.token_ids)) > 3


def test_batch_of_different_lengths_matches_each_alone(cpmant):
    _, model_dir = cpmant
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=4)
    prompts = [PROMPT, PROMPT[:3], [2, *range(100, 125)], [2]]
    sampled = SamplingParams(max_tokens=12, temperature=1.0, top_k=40, seed=7, ignore_eos=True)
    for params in (GREEDY, sampled):
        alone = [engine.generate(p, params).token_ids for p in prompts]
        assert [c.token_ids for c in engine.generate_batch(prompts, params)] == alone


def test_a_prompt_longer_than_the_step_budget_is_prefilled_in_one_piece(cpmant):
    """Its tokens attend both ways, so chunking it would change the answer: it runs whole, over the budget."""
    hf, model_dir = cpmant
    prompt = [2, *range(100, 130)]
    small = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=2, max_tokens_per_step=8)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    first = small.add_request(PROMPT, params)
    small.step()  # the first prompt is running; the long one is admitted next, whole
    second = small.add_request(prompt, params)
    tokens = {first: list(small.sequence(first).output_ids), second: []}
    while small.has_unfinished():
        for out in small.step():
            tokens[out.seq_id].append(out.token_id)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert tokens[second] == ref[0, len(prompt) :].tolist()


def test_int8_agrees_with_fp32(cpmant):
    _, model_dir = cpmant
    fp32 = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    int8 = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1, quantize="int8")
    tokens = fp32.generate(PROMPT, GREEDY).token_ids
    ids = [*PROMPT, *tokens]
    ref = fp32.runner.forward_all([Chunk(0, ids[:-1], 0)])[0][len(PROMPT) - 1 :]
    got = int8.runner.forward_all([Chunk(0, ids[:-1], 0)])[0][len(PROMPT) - 1 :]
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean().item() >= 0.9
    assert ((got - ref).norm() / ref.norm()).item() < 0.08


def test_offloaded_generation_matches_resident(cpmant):
    _, model_dir = cpmant
    resident = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=2)
    model, _ = load_model(model_dir, CPU, torch.float32, memory_limit=2**40, max_batch_size=2)
    plan = model.offload.plan
    limit = plan.device_bytes - plan.resident_bytes + 2 * max(plan.layer_bytes)  # two slots, nothing resident
    offloaded = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=2, memory_limit=limit)
    assert offloaded.offload.plan.streamed and offloaded.offload.plan.host_fixed_bytes > 0
    prompts = [PROMPT, [2, *range(100, 120)]]
    assert [c.token_ids for c in offloaded.generate_batch(prompts, GREEDY)] == \
        [c.token_ids for c in resident.generate_batch(prompts, GREEDY)]


def test_engine_reads_the_cpm_vocabulary_and_writes_chinese(cpmant):
    _, model_dir = cpmant
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    assert isinstance(engine.tokenizer, CpmTokenizer)
    prompt = "床前明月光，"
    assert engine.encode(prompt) == tf.CpmAntTokenizer(str(model_dir / "vocab.txt")).encode(prompt)
    out = engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    assert out.completion_tokens == 16 and out.text == engine.tokenizer.decode(out.token_ids)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in out.text)


def test_a_checkpoint_without_a_head_uses_the_vocabulary_rows_of_the_embedding(cpmant, tmp_path):
    hf, model_dir = cpmant
    shutil.copytree(model_dir, tmp_path / "m")
    weights = load_file(model_dir / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    model, context = load_model(tmp_path / "m", CPU, torch.float32)
    runner = ModelRunner(model, CPU, torch.float32, num_slots=1, context=context)
    ours = runner.forward_all([Chunk(0, PROMPT, 0)])[0]
    headless = tf.CpmAntForCausalLM(hf.config).eval()
    headless.load_state_dict(hf.state_dict())
    with torch.no_grad():
        headless.lm_head.weight.copy_(hf.cpmant.input_embedding.weight[: hf.config.vocab_size])
        ref = headless(input_ids=torch.tensor([PROMPT])).logits[0]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_too_few_segment_types_is_a_load_error(cpmant, tmp_path):
    _, model_dir = cpmant
    shutil.copytree(model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "segment_types": 2}))
    with pytest.raises(ModelLoadError, match=r"segment_types 2 .* at least 3"):
        load_model(tmp_path / "m", CPU, torch.float32)


def test_warm_up_reaches_every_row_bucket_of_its_steps(cpmant, monkeypatch):
    """CPM-Ant's prefills carry its prompt tokens in front, and its prompts run whole past the step budget: the
    load-time warm-up (GPU) must still reach each row count its int8 products tune for. Its forward passes
    run here, on the CPU, with the rows each product sees recorded."""
    from triton import next_power_of_2

    from vramlite.engine.layers import linear

    _, model_dir = cpmant
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=4, max_tokens_per_step=8,
                             context=40, quantize="int8", cpu_layout="dense")
    seen: set[int] = set()
    real = linear.int8_linear
    monkeypatch.setattr(linear, "int8_linear", lambda x, *a: seen.add(x.numel() // x.shape[-1]) or real(x, *a))
    for chunks in engine.runner.warm_up_batches(8):
        engine.runner.forward(chunks)
    buckets = {next_power_of_2(m) for m in seen}  # W8A16 tiles and W8A8 keys go by powers of two
    prefix = engine.config.cache_prefix
    # decode steps of 1 to 4 sequences; whole prompts of 1 to 40 tokens with the prompt tokens in front
    wanted = {1, 2, 4} | {next_power_of_2(n + prefix) for n in range(1, 41)}
    assert wanted <= buckets, sorted(wanted - buckets)
