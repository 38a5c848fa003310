"""Decode steps compiled by torch.compile give the eager runner's logits; where compiling is not used, it says why."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as tf
from torch._dynamo.utils import counters

from tests.conftest import save_tiny_model
from vramlite.engine.layers.cpu_layout import onednn_int8_available
from vramlite.engine.loader import load_model
from vramlite.engine.runner import Chunk, ModelRunner, torch_compiles_decode

CPU = torch.device("cpu")
VOCAB = 512
CASES = {
    "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                                      n_positions=64)),
    # sequences outgrow the window during the tests, in the graphs compiled at load
    "mistral-sliding": lambda: tf.MistralForCausalLM(tf.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=6)),
}
PROMPTS = ([5, 9, 13, 2, 7], [40, 41, 42], list(range(100, 111)))
COMPILES = pytest.mark.skipif(not torch_compiles_decode(), reason=f"torch {torch.__version__} decodes eagerly")


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory, spm_tokenizer_dir):
    torch.manual_seed(0)
    return save_tiny_model(CASES[request.param]().eval(), tmp_path_factory.mktemp(request.param), spm_tokenizer_dir)


@pytest.fixture(scope="module")
def runners(model_dir) -> tuple[ModelRunner, ModelRunner]:
    """(eager, compiled) runners of 3 slots, each over its own load of the model (each lays its weights out)."""
    return make_runner(model_dir, False), make_runner(model_dir, True)


def make_runner(model_dir, compile_decode: bool, slots: int = 3, cpu_layout: str = "auto",
                quantize: str | None = None, dtype: torch.dtype = torch.float32) -> ModelRunner:
    """A runner of its own load of the model; compiled, it must have compiled graphs of its own (two when it
    batches), however many runners this process compiled before."""
    graphs = counters["stats"]["unique_graphs"]
    model, context = load_model(model_dir, CPU, dtype, quantize=quantize)
    runner = ModelRunner(model, CPU, dtype, slots, context, compile_decode=compile_decode, cpu_layout=cpu_layout)
    if compile_decode:
        assert counters["stats"]["unique_graphs"] == graphs + (2 if slots > 1 else 1)
    return runner


def decode(runner: ModelRunner, prompts: dict[int, list[int]], steps: int) -> list[torch.Tensor]:
    """Prefill each slot's prompt, then `steps` decode steps of all slots together (next token: id 3 + step);
    the logits of each decode step."""
    for slot, ids in prompts.items():
        runner.forward([Chunk(slot, ids, 0)])
    # the chunks go in reverse slot order: the runner packs them by slot and must hand logits back in this order
    return [runner.forward([Chunk(slot, [3 + t], len(ids) + t) for slot, ids in reversed(prompts.items())])
            for t in range(steps)]


@COMPILES
@pytest.mark.slow
def test_single_sequence_decode_compiled_matches_eager(runners):
    eager, compiled = runners
    graphs = counters["stats"]["unique_graphs"]
    for slot, prompt in enumerate(PROMPTS):  # slots 0, 1, 2: the graph compiled at load serves them all
        for got, want in zip(decode(compiled, {slot: prompt}, 6), decode(eager, {slot: prompt}, 6), strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert compiled._decode_step is not None  # it ran compiled, not after falling back
    assert counters["stats"]["unique_graphs"] == graphs


@COMPILES
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dense", "rows", "packed"])
def test_each_cpu_layout_compiles(runners, model_dir, layout):
    """Whichever layout the linears get (by timing, it depends on the machine): plain weights, row blocks
    (`split_gemv`) or oneDNN's packed weights (a custom op in the graph) compile to eager's logits."""
    eager, _ = runners
    compiled = make_runner(model_dir, True, slots=1, cpu_layout=layout)
    for got, want in zip(decode(compiled, {0: PROMPTS[2]}, 4), decode(eager, {0: PROMPTS[2]}, 4), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert compiled._decode_step is not None


@pytest.mark.slow
@pytest.mark.parametrize("batch", [
    {0: PROMPTS[0], 1: PROMPTS[1], 2: PROMPTS[2]},  # different lengths: a length mask
    {0: PROMPTS[1], 2: PROMPTS[1]},  # slots 0 and 2, equal lengths: gathered, not a view, and no mask
], ids=["lengths", "gathered-slots"])
@COMPILES
def test_batches_decode_compiled_in_the_graphs_compiled_at_load(runners, batch):
    eager, compiled = runners
    graphs = counters["stats"]["unique_graphs"]
    for got, want in zip(decode(compiled, batch, 4), decode(eager, batch, 4), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert compiled._decode_step is not None
    assert counters["stats"]["unique_graphs"] == graphs


@COMPILES
@pytest.mark.slow
def test_runners_of_alike_models_keep_their_own_graphs(tmp_path, spm_tokenizer_dir):
    """A compiled step guards its inputs, not the runner's model (runner._step_guards), so each runner
    must look up only the graphs it compiled: two models of equal shapes whose graphs differ (the MLP's
    activation, baked into the graph), both alive, each decode as their eager runners do."""
    compiled, eager = [], []
    for act in ("silu", "gelu"):
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, hidden_act=act))
        model_dir = save_tiny_model(model.eval(), tmp_path / act, spm_tokenizer_dir)
        compiled.append(make_runner(model_dir, True, slots=1))
        eager.append(make_runner(model_dir, False, slots=1))
    first = decode(eager[0], {0: PROMPTS[2]}, 4)
    for c, e in zip(compiled, eager, strict=True):
        want = decode(e, {0: PROMPTS[2]}, 4)
        for got, w in zip(decode(c, {0: PROMPTS[2]}, 4), want, strict=True):
            torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-5)
        assert c._decode_step is not None
    assert not torch.allclose(want[-1], first[-1], atol=1e-3)  # the two models do differ


@COMPILES
@pytest.mark.slow
def test_prefill_beside_decode_runs_eagerly(runners):
    """A step that mixes a prefill with decode tokens is not compiled; the results still match."""
    eager, compiled = runners
    graphs = counters["stats"]["unique_graphs"]
    for runner in (eager, compiled):
        runner.forward([Chunk(0, PROMPTS[0], 0)])
    mixed = [Chunk(0, [3], len(PROMPTS[0])), Chunk(1, PROMPTS[1], 0)]
    torch.testing.assert_close(compiled.forward(mixed), eager.forward(mixed), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs


@COMPILES
def test_failing_compiled_step_falls_back_to_eager(runners, model_dir, caplog):
    eager, _ = runners
    runner = make_runner(model_dir, False, slots=1)

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    runner._decode_step = broken
    with caplog.at_level(logging.ERROR, logger="vramlite.engine.runner"):
        got = decode(runner, {0: PROMPTS[0]}, 2)
    assert runner._decode_step is None and "run eagerly from now on" in caplog.text
    for g, w in zip(got, decode(eager, {0: PROMPTS[0]}, 2), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dense", pytest.param("packed", marks=pytest.mark.skipif(
    not onednn_int8_available(), reason="no exact oneDNN int8 linear on this CPU"))])
@COMPILES
def test_int8_weights_compile_to_eager_logits(model_dir, layout):
    """int8 linears reach the graph as one custom op: `vramlite::int8_linear` (dense), or oneDNN's int8 product
    (`vramlite::onednn_int8_matmul`, packed) after the per-token quantization of x, which Inductor fuses.
    Activations are rounded to bf16 for torch's int8 kernel, or to int8 codes, so a last-bit difference in a
    fused op can move one by a step (seen on a 130M LLaMA: logits up to 0.016 apart): hence the tolerance."""
    eager, compiled = (make_runner(model_dir, c, cpu_layout=layout, quantize="int8") for c in (False, True))
    batch = {0: PROMPTS[0], 1: PROMPTS[1], 2: PROMPTS[2]}
    for prompts in ({1: PROMPTS[2]}, batch):
        for got, want in zip(decode(compiled, prompts, 4), decode(eager, prompts, 4), strict=True):
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@COMPILES
@pytest.mark.slow
def test_bf16_compiles_to_eager_logits(model_dir):
    """In bf16 the compiled step's products differ from eager's in rounding only: one-row products of small
    weights become Inductor's loops (fp32 sums, one rounding at the end) where eager calls torch's matmul. Logits of
    about 1 were seen up to 0.004 (one bf16 step) apart."""
    eager, compiled = (make_runner(model_dir, c, dtype=torch.bfloat16) for c in (False, True))
    batch = {0: PROMPTS[0], 1: PROMPTS[1], 2: PROMPTS[2]}
    for prompts in ({1: PROMPTS[2]}, batch):
        for got, want in zip(decode(compiled, prompts, 4), decode(eager, prompts, 4), strict=True):
            torch.testing.assert_close(got, want, atol=1e-2, rtol=1e-2)
    assert compiled._decode_step is not None


def test_streamed_layers_are_not_compiled(model_dir, caplog):
    model, context = load_model(model_dir, CPU, torch.float32, memory_limit="1GiB")
    with caplog.at_level(logging.WARNING, logger="vramlite.engine.runner"):
        runner = ModelRunner(model, CPU, torch.float32, 1, context, compile_decode=True)
    assert runner._decode_step is None
    assert "compiled decode is off: layers are streamed under a memory limit" in caplog.text
