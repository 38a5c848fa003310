"""int8 models: quantize-at-load vs fp32, int8 checkpoints written by `quantize_checkpoint`, and their loading."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open

from tests.conftest import save_tiny_model
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.layers.linear import QuantizedLinear
from vramlite.engine.loader import load_model
from vramlite.engine.quantize import quantize_checkpoint
from vramlite.engine.runner import Chunk, ModelRunner

CPU = torch.device("cpu")
CASES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attention_bias=True)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4,
                                                      n_positions=128, bos_token_id=1, eos_token_id=2)),
}


@pytest.fixture(scope="module", params=list(CASES))
def model_dir(request, tmp_path_factory, spm_tokenizer_dir):
    torch.manual_seed(0)
    return save_tiny_model(CASES[request.param](), tmp_path_factory.mktemp(request.param), spm_tokenizer_dir)


def logits(model_dir, **kwargs) -> torch.Tensor:
    model, context = load_model(model_dir, CPU, torch.float32, **kwargs)
    runner = ModelRunner(model, CPU, torch.float32, num_slots=1, context=context)
    return runner.forward_all([Chunk(0, list(range(3, 40)), 0)])[0]


def test_int8_at_load_is_close_to_fp32(model_dir):
    model, _ = load_model(model_dir, CPU, torch.float32, quantize="int8")
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert quantized and all(m.qweight.dtype == torch.int8 for m in quantized)
    ref, q = logits(model_dir), logits(model_dir, quantize="int8")
    rel = (q - ref).norm() / ref.norm()
    assert rel < 0.02, f"relative logit error {rel:.4f}"
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_int8_checkpoint_round_trip(model_dir, tmp_path):
    out = quantize_checkpoint(model_dir, tmp_path / "int8")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "vramlite-int8"
    with safe_open(out / "model.safetensors", "pt") as f:
        int8 = [n for n in f.keys() if f.get_slice(n).get_dtype() == "I8"]  # noqa: SIM118
        assert int8 and all(n + "_scale" in f.keys() for n in int8)  # noqa: SIM118
    assert (out / "tokenizer.model").exists()
    # Loads as int8 with no re-quantization, to exactly the weights quantize-at-load gives.
    torch.testing.assert_close(logits(out), logits(model_dir, quantize="int8"), atol=0, rtol=0)


def test_int8_checkpoint_generates(model_dir, tmp_path):
    out = quantize_checkpoint(model_dir, tmp_path / "int8")
    engine = Engine.from_dir(out, device="cpu")
    result = engine.generate("Hello", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert result.completion_tokens == 8


def test_sharded_int8_checkpoint(model_dir, tmp_path):
    out = quantize_checkpoint(model_dir, tmp_path / "int8", shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("*.safetensors"))) > 1
    torch.testing.assert_close(logits(out), logits(model_dir, quantize="int8"), atol=0, rtol=0)


def test_quantize_refuses_bad_input(model_dir, tmp_path):
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(model_dir, model_dir)
    out = quantize_checkpoint(model_dir, tmp_path / "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again")
    with pytest.raises(ValueError, match="quantize 'int4'"):
        load_model(model_dir, CPU, torch.float32, quantize="int4")


def test_cli_quantize_then_generate(model_dir, tmp_path, capsys):
    from vramlite.server.cli import main

    assert main(["quantize", str(model_dir), str(tmp_path / "q")]) == 0
    assert main(["generate", "--model", str(tmp_path / "q"), "--temperature", "0", "--max-tokens", "4", "Hi"]) == 0
    assert capsys.readouterr().out.startswith("wrote the int8 checkpoint")
    assert main(["generate", "--model", str(model_dir), "--quantize", "int8", "--max-tokens", "4", "Hi"]) == 0


def test_warm_up_rows_reach_every_row_bucket():
    from vramlite.engine.runner import warm_up_rows

    assert warm_up_rows(512) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert warm_up_rows(300) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]  # 300 rows tune as 512
    assert warm_up_rows(1) == [1] and warm_up_rows(3) == [1, 2, 3]


@pytest.mark.parametrize("name", ["demo-llama", "demo-t5"])
def test_warm_up_batches_are_steps_the_runner_takes(name):
    """The load-time warm-up's forward passes (run on a GPU only) are valid steps for each family: a prefill
    per row count up to the step budget, or up to the context where prompts run whole (an encoder's)."""
    from vramlite import models

    engine = Engine.from_dir(models.path(name), device="cpu", quantize="int8", max_batch_size=2,
                             max_tokens_per_step=16, context=64)
    batches = engine.runner.warm_up_batches(16)
    sizes = [sum(len(c.token_ids) for c in chunks) for chunks in batches]
    assert sizes == ([1, 2, 4, 8, 16, 32, 64] if engine.config.is_encoder_decoder else [1, 2, 4, 8, 16])
    for chunks in batches:
        assert engine.runner.forward(chunks).isfinite().all()


@pytest.mark.gpu
def test_int8_kernels_are_tuned_at_load_not_in_requests():
    from vramlite import models
    from vramlite.kernels import _common

    engine = Engine.from_dir(models.path(), device="cuda", quantize="int8", max_batch_size=4, max_tokens_per_step=64)
    tuned = dict(_common._tuned)
    assert tuned
    prompts = ["床前明月光，" * n for n in (1, 3, 9)]  # prefills of a few to tens of tokens, then batched decode
    engine.generate_batch(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert _common._tuned == tuned
