"""An offloaded model answers as the resident one: logits and greedy tokens, fp32 / fp16 and int8, batched.

On the CPU the streamed layers take the same path as on a GPU (host arena →
slot copies, the same schedule), with synchronous copies. Logits are compared
to 1e-5 rather than bitwise: CPU BLAS results depend on the weights' address
alignment, which differs between a slot and the mmap'd checkpoint.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf

from tests.conftest import save_tiny_model
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.kv_cache import KVCache
from vramlite.engine.loader import kv_cache_bytes, load_model
from vramlite.engine.offload.arena import HostArena
from vramlite.engine.offload.layout import LayerLayout
from vramlite.engine.runner import Chunk, ModelRunner

VOCAB, LAYERS, BATCH = 512, 6, 3
FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4,
                                                      n_positions=128, bos_token_id=1, eos_token_id=2)),
    # q/k norms and four layer norms: small weights beside the linears in each streamed layer; layers of two
    # kinds (sliding windows, a rope each)
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, max_position_embeddings=128, sliding_window=8, sliding_window_pattern=3)),
}
DEVICES = [pytest.param("cpu", "fp32", id="cpu-fp32"),
           pytest.param("cuda", "fp16", id="cuda-fp16", marks=pytest.mark.gpu)]
PROMPTS = [[1, 5, 9, 33], [1, *range(20, 41)], [1, 300, 301, 302, 303, 304, 305]]


@pytest.fixture(scope="module", params=list(FAMILIES))
def model_dir(request, tmp_path_factory, spm_tokenizer_dir):
    torch.manual_seed(0)
    return save_tiny_model(FAMILIES[request.param]().eval(), tmp_path_factory.mktemp(request.param),
                           spm_tokenizer_dir)


def half_streamed_limit(model_dir, device: torch.device, dtype: torch.dtype, quantize: str | None) -> int:
    """A memory_limit that keeps 2 of the 6 layers resident and streams 4 through 2 slots."""
    model, _ = load_model(model_dir, device, dtype, quantize=quantize, memory_limit=2**40, max_batch_size=BATCH)
    plan = model.offload.plan
    assert plan.streamed == ()
    return plan.device_bytes - plan.resident_bytes + 4 * max(plan.layer_bytes)


def run(model, device: torch.device, dtype: torch.dtype, context: int) -> list[torch.Tensor]:
    """Prefill a batch of prompts of different lengths, then 6 batched decode steps; every logit row."""
    runner = ModelRunner(model, device, dtype, num_slots=BATCH, context=context)
    out = runner.forward_all([Chunk(slot, p, 0) for slot, p in enumerate(PROMPTS)])
    for t in range(6):
        out.append(runner.forward([Chunk(slot, [7 + t + slot], len(p) + t) for slot, p in enumerate(PROMPTS)]))
    return out


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_offloaded_logits_match_resident(model_dir, device, dtype, quantize):
    dev, dt = torch.device(device), {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    limit = half_streamed_limit(model_dir, dev, dt, quantize)
    resident, context = load_model(model_dir, dev, dt, quantize=quantize)
    offloaded, _ = load_model(model_dir, dev, dt, quantize=quantize, memory_limit=limit, max_batch_size=BATCH)
    plan = offloaded.offload.plan
    assert len(plan.streamed) == 4 and plan.num_slots == 2 and plan.device_bytes <= limit
    # An embedding the head does not share (untied, or the head is its int8 copy) is left in host memory; a
    # shared one is on the device as the head.
    embedding = offloaded.input_embeddings().weight
    assert bool(plan.host_fixed_bytes) is (getattr(offloaded.lm_head, "weight", None) is not embedding)
    assert embedding.device.type == ("cpu" if plan.host_fixed_bytes else dev.type)
    ref, got = run(resident, dev, dt, context), run(offloaded, dev, dt, context)
    atol = 1e-5 if dt == torch.float32 else 1e-3
    for a, b in zip(ref, got, strict=True):
        torch.testing.assert_close(b, a, atol=atol, rtol=0)
        assert torch.equal(a.argmax(-1), b.argmax(-1))
    snap = offloaded.offload.stats.snapshot()
    assert snap.streamed_layers == 4 and snap.resident_layers == 2
    # 7 forward passes × 4 streamed layers, the first prefetches of an 8th pass at most
    assert 7 * 4 <= snap.num_copies <= 8 * 4
    assert snap.h2d_bytes == sum(snap.h2d_bytes // snap.num_copies for _ in range(snap.num_copies))
    if dev.type == "cuda":
        torch.cuda.synchronize()
        offloaded.offload.streamer.copies.poll()
        snap = offloaded.offload.stats.snapshot()
        assert snap.pinned_bytes == snap.host_bytes > 0 and snap.h2d_bandwidth > 0
        assert offloaded.offload.arena.buffer.is_pinned()


@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize(("device", "dtype"), DEVICES)
def test_offloaded_greedy_batch_matches_resident(model_dir, device, dtype, quantize):
    limit = half_streamed_limit(model_dir, torch.device(device), {"fp32": torch.float32, "fp16": torch.float16}[dtype],
                                quantize)
    # log-probabilities too: the prompt's are scored from every row of the prefill, block by block
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    kwargs = dict(device=device, dtype=dtype, max_batch_size=BATCH, quantize=quantize)
    resident = Engine.from_dir(model_dir, **kwargs)
    offloaded = Engine.from_dir(model_dir, memory_limit=limit, **kwargs)
    assert resident.offload is None
    assert len(offloaded.offload.plan.streamed) >= LAYERS // 2
    ref, got = resident.generate_batch(PROMPTS, params), offloaded.generate_batch(PROMPTS, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    atol = 1e-4 if dtype == "fp32" else 2e-2
    for a, b in zip(ref, got, strict=True):
        scored = [(x.chosen.logprob, y.chosen.logprob) for x, y in zip(a.logprobs, b.logprobs, strict=True)]
        scored += [(x.chosen.logprob, y.chosen.logprob)
                   for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], strict=True)]
        assert [y for _, y in scored] == pytest.approx([x for x, _ in scored], abs=atol)
    # embeddings: every prompt row's final hidden state, pooled
    embedded = [torch.tensor(engine.embed(PROMPTS, "mean")) for engine in (resident, offloaded)]
    torch.testing.assert_close(embedded[1], embedded[0], atol=atol, rtol=0)


def test_limit_given_as_a_string_and_prefetch_depth(model_dir):
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1, memory_limit="4MiB",
                             prefetch_depth=2)
    plan = engine.offload.plan
    assert plan.memory_limit == 4 * 2**20 and plan.prefetch_depth == 2
    assert engine.offload.streamer is None or engine.offload.streamer.num_slots == min(3, len(plan.streamed))


def test_a_snapshot_accounts_the_copies_finished_since_the_last_layer(model_dir, monkeypatch):
    """A GPU's copies are timed when polled, which the streamer does before each layer: a reading (a metrics
    scrape, the bench's last one) polls too, so an idle engine's last prefetches are in it."""
    limit = half_streamed_limit(model_dir, torch.device("cpu"), torch.float32, None)
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=BATCH, memory_limit=limit)
    store = engine.offload
    assert store.streamer is not None
    polled = []
    monkeypatch.setattr(store.streamer.copies, "poll", lambda: polled.append(store.stats.snapshot().h2d_bytes))
    engine.generate("hello", max_tokens=2)
    layers = len(polled)
    assert layers > 0 and store.snapshot().h2d_bytes == polled[-1] == store.stats.snapshot().h2d_bytes
    assert len(polled) == layers + 1


def test_too_small_a_budget_names_the_smallest_that_works(model_dir):
    with pytest.raises(ValueError, match=r"smallest budget that works is .* \(with max_batch_size=1 it takes"):
        Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=4, memory_limit="100KiB")


def test_plan_is_logged(model_dir, caplog):
    limit = half_streamed_limit(model_dir, torch.device("cpu"), torch.float32, "int8")
    with caplog.at_level(logging.INFO, logger="vramlite.engine.offload"):
        load_model(model_dir, torch.device("cpu"), torch.float32, quantize="int8", memory_limit=limit,
                   max_batch_size=BATCH)
    text = caplog.text
    assert "2 of 6 layers resident" in text and "4 layers streamed" in text and "2 swap slots" in text


def test_kv_cache_bytes_is_what_the_cache_allocates(model_dir):
    model, context = load_model(model_dir, torch.device("cpu"), torch.float32)
    cfg = model.config
    cache = KVCache(cfg.num_layers, BATCH, context, cfg.num_kv_heads, cfg.head_dim, torch.float16, "cpu")
    assert kv_cache_bytes(cfg, BATCH, context, torch.float16) == cache.nbytes


def test_host_arena_holds_just_the_streamed_layers(tmp_path, spm_tokenizer_dir):
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512,
                                            num_hidden_layers=8, num_attention_heads=4, max_position_embeddings=64))
    model_dir = save_tiny_model(hf, tmp_path, spm_tokenizer_dir)
    for quantize in (None, "int8"):
        model, _ = load_model(model_dir, torch.device("cpu"), torch.float32, quantize=quantize,
                              memory_limit=2**40)
        plan = model.offload.plan
        limit = plan.device_bytes - plan.resident_bytes + 4 * max(plan.layer_bytes)  # 2 resident
        model, _ = load_model(model_dir, torch.device("cpu"), torch.float32, quantize=quantize, memory_limit=limit)
        store = model.offload
        streamed = sum(LayerLayout.of(model.blocks()[i], torch.float32).tensor_bytes for i in store.plan.streamed)
        assert len(store.plan.streamed) == 6
        assert streamed <= store.arena.nbytes <= 1.05 * streamed
        assert store.stats.snapshot().host_bytes == store.arena.nbytes


def test_pinning_failure_falls_back_to_pageable(caplog):
    layout = LayerLayout.of(torch.nn.Linear(16, 16), torch.float32)
    with caplog.at_level(logging.WARNING, logger="vramlite.engine.offload"):
        arena = HostArena([layout, layout], register=lambda ptr, nbytes: 2)  # cudaErrorMemoryAllocation
    assert not arena.pinned and arena.pin_refused and arena.nbytes == 2 * layout.nbytes
    assert "could not pin" in caplog.text and "pageable" in caplog.text and "ulimit -l" in caplog.text
    arena.region(1).fill_(3)  # still usable
    assert HostArena([layout], register=lambda ptr, nbytes: 0).pinned
    assert not HostArena([layout], register=None).pin_refused  # a CPU device asks for no pinning
