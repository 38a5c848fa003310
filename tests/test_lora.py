"""LoRA adapters merged at load against PEFT's own forward pass, on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from tests.conftest import save_tiny_model
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.loader import load_model
from vramlite.engine.lora import parse_adapter
from vramlite.engine.quantize import quantize_checkpoint
from vramlite.engine.runner import Chunk, ModelRunner

peft = pytest.importorskip("peft")

VOCAB = 512
LLAMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(1))


def base_llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).eval()


def save_adapter(model, out, seed: int = 1, **lora):
    """Wrap `model` with a LoRA of random (non-zero) factors, save it to `out`; returns the PEFT model."""
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora)).eval()
    wrapped.save_pretrained(out)
    return wrapped


@torch.inference_mode()
def our_logits(model_dir, lora=(), quantize=None) -> torch.Tensor:
    model, context = load_model(model_dir, torch.device("cpu"), torch.float32, quantize=quantize, lora=lora)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, num_slots=1, context=context)
    return runner.forward_all([Chunk(0, IDS[0].tolist(), 0)])[0]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_model(base_llama(), tmp_path_factory.mktemp("llama"), spm_tokenizer_dir)


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS),
    # per-module ranks and alphas, rsLoRA's scaling
    dict(r=4, lora_alpha=16, target_modules=LLAMA_TARGETS, rank_pattern={"down_proj": 2},
         alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}, use_rslora=True),
    # an adapted embedding (whose base PEFT saves too) and a head trained whole
    dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"]),
], ids=["all-linears", "patterns-rslora", "embedding-head"])
def test_adapted_llama_matches_peft(llama_dir, tmp_path, lora):
    wrapped = save_adapter(base_llama(), tmp_path / "adapter", **lora)
    with torch.inference_mode():
        ref = wrapped(IDS).logits[0]
        base = wrapped.get_base_model()
    torch.testing.assert_close(our_logits(llama_dir, [(tmp_path / "adapter", 1.0)]), ref, atol=1e-4, rtol=0)
    with wrapped.disable_adapter(), torch.inference_mode():  # the adapter does change the model
        assert (base(IDS).logits[0] - ref).abs().max() > 1e-2


def test_gpt2_conv1d_layout_adapter_matches_peft(tmp_path, spm_tokenizer_dir):
    """GPT-2 stores its linears [in, out]: PEFT's fan_in_fan_out adapters are transposed to match."""
    def gpt2():
        torch.manual_seed(0)
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                bos_token_id=1, eos_token_id=2)).eval()

    model_dir = save_tiny_model(gpt2(), tmp_path / "gpt2", spm_tokenizer_dir)
    wrapped = save_adapter(gpt2(), tmp_path / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_fc", "c_proj"])
    with torch.inference_mode():
        ref = wrapped(IDS).logits[0]
    torch.testing.assert_close(our_logits(model_dir, [(tmp_path / "adapter", 1.0)]), ref, atol=1e-4, rtol=0)


def test_two_adapters_add_up_each_at_its_scale(llama_dir, tmp_path):
    save_adapter(base_llama(), tmp_path / "a", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    save_adapter(base_llama(), tmp_path / "b", seed=2, r=2, lora_alpha=2, target_modules=["v_proj", "up_proj"])
    ref = base_llama()
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "a").merge_and_unload()
    ref = peft.PeftModel.from_pretrained(ref, tmp_path / "b")
    for module in ref.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.scale_layer(0.5)
    with torch.inference_mode():
        expected = ref(IDS).logits[0]
    got = our_logits(llama_dir, [(tmp_path / "a", 1.0), (tmp_path / "b", 0.5)])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_int8_of_the_adapted_model_at_load_and_in_a_quantized_checkpoint(llama_dir, tmp_path, spm_tokenizer_dir):
    """quantize="int8" quantizes the merged weights; `vramlite quantize --lora` writes the very same."""
    wrapped = save_adapter(base_llama(), tmp_path / "adapter", r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)
    merged_dir = save_tiny_model(wrapped.merge_and_unload(), tmp_path / "merged", spm_tokenizer_dir)
    adapter = [(tmp_path / "adapter", 1.0)]
    at_load = our_logits(llama_dir, adapter, quantize="int8")
    torch.testing.assert_close(at_load, our_logits(merged_dir, quantize="int8"), atol=1e-4, rtol=0)
    int8_dir = quantize_checkpoint(llama_dir, tmp_path / "int8", lora=adapter)
    torch.testing.assert_close(our_logits(int8_dir), at_load, atol=0, rtol=0)


def test_an_adapter_cannot_go_into_an_int8_checkpoint(llama_dir, tmp_path):
    save_adapter(base_llama(), tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj"])
    int8_dir = quantize_checkpoint(llama_dir, tmp_path / "int8")
    with pytest.raises(ModelLoadError, match="stores in int8: apply the adapter to the float checkpoint"):
        load_model(int8_dir, torch.device("cpu"), torch.float32, lora=[(tmp_path / "adapter", 1.0)])


def test_an_adapter_for_another_model_is_refused_before_loading(llama_dir, tmp_path):
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128))
    save_adapter(gpt2, tmp_path / "gpt2-adapter", r=4, lora_alpha=8, target_modules=["c_attn"])
    with pytest.raises(ModelLoadError, match=r"changes 2 tensors that .* does not have .*transformer\.h\.0"):
        load_model(llama_dir, torch.device("cpu"), torch.float32, lora=[(tmp_path / "gpt2-adapter", 1.0)])
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(**{**LLAMA, "intermediate_size": 128}))
    save_adapter(wider, tmp_path / "wider", r=4, lora_alpha=8, target_modules=["up_proj"])
    with pytest.raises(ModelLoadError, match=r"up_proj.weight of shape \(128, 64\), the model \(96, 64\)"):
        load_model(llama_dir, torch.device("cpu"), torch.float32, lora=[(tmp_path / "wider", 1.0)])


def test_adapters_we_cannot_merge_are_refused_with_the_reason(llama_dir, tmp_path):
    save_adapter(base_llama(), tmp_path / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    ia3 = peft.get_peft_model(base_llama(), peft.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    ia3.save_pretrained(tmp_path / "ia3")
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    cases = {tmp_path / "dora": "use_dora is not supported", tmp_path / "ia3": "peft_type is 'IA3', not 'LORA'",
             bin_only: "no adapter_model.safetensors", tmp_path / "nowhere": "does not exist"}
    for path, message in cases.items():
        with pytest.raises(ModelLoadError, match=message):
            load_model(llama_dir, torch.device("cpu"), torch.float32, lora=[(path, 1.0)])


def test_adapter_specs_read_a_scale_after_the_last_colon_only_when_it_is_a_number():
    assert parse_adapter("adapters/chat") == ("adapters/chat", 1.0)
    assert parse_adapter("adapters/chat:0.5") == ("adapters/chat", 0.5)
    assert parse_adapter("C:/adapters/chat:-1") == ("C:/adapters/chat", -1.0)
    assert parse_adapter("odd:name") == ("odd:name", 1.0)
