"""Loading HF-format directories: sharded checkpoints, lazy reads, and one clear error per bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from tests.conftest import save_tiny_llama, save_tiny_model
from vramlite.engine import Engine
from vramlite.engine.config import parse_rope
from vramlite.engine.errors import ModelLoadError, PromptTooLongError
from vramlite.engine.loader import load_model, meta_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), spm_tokenizer_dir, hidden_size=32,
                           intermediate_size=64, max_position_embeddings=64)


def copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_loads_same_weights(tmp_path, llama_dir, spm_tokenizer_dir):
    hf = tf.LlamaForCausalLM.from_pretrained(llama_dir)
    sharded = save_tiny_model(hf, tmp_path / "sharded", spm_tokenizer_dir, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, _ = load_model(llama_dir, CPU, torch.float32)
    b, _ = load_model(sharded, CPU, torch.float32)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_dtype_is_applied(llama_dir):
    model, _ = load_model(llama_dir, CPU, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope", CPU, torch.float32)


def test_missing_config(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        load_model(d, CPU, torch.float32)


def test_config_not_json(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    (d / "config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="not readable JSON"):
        load_model(d, CPU, torch.float32)


def test_unknown_model_type(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ModelLoadError, match=r"model_type 'bert' is not supported.*llama"):
        load_model(d, CPU, torch.float32)


def test_no_weights(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(d, CPU, torch.float32)


def test_missing_tensor_is_named(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' is missing"):
        load_model(d, CPU, torch.float32)


def test_misshaped_tensor_is_named(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 32)
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight.*shape \(8, 32\), expected \(16, 32\)"):
        load_model(d, CPU, torch.float32)


def test_corrupt_safetensors(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load_model(d, CPU, torch.float32)


def test_missing_shard(tmp_path, llama_dir, spm_tokenizer_dir):
    hf = tf.LlamaForCausalLM.from_pretrained(llama_dir)
    d = save_tiny_model(hf, tmp_path / "sharded", spm_tokenizer_dir, max_shard_size="20KB")
    next(iter(sorted(d.glob("model-*.safetensors")))).unlink()
    with pytest.raises(ModelLoadError, match=r"names shard .* which is missing"):
        load_model(d, CPU, torch.float32)


def test_missing_tokenizer(tmp_path, llama_dir):
    d = copy(llama_dir, tmp_path)
    (d / "tokenizer.model").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        Engine.from_dir(d, device="cpu")


def test_prompt_longer_than_context_names_both_numbers(llama_dir):
    engine = Engine.from_dir(llama_dir, device="cpu", context=32)
    with pytest.raises(PromptTooLongError, match="prompt is 40 tokens but the context holds 32"):
        engine.generate(list(range(3, 43)))


def test_context_beyond_model_limit(llama_dir):
    with pytest.raises(ValueError, match="exceeds the model's limit of 64"):
        Engine.from_dir(llama_dir, device="cpu", context=100)


def test_generation_stops_at_context(llama_dir):
    engine = Engine.from_dir(llama_dir, device="cpu", context=16)
    out = engine.generate(list(range(3, 13)), max_tokens=100, temperature=0, ignore_eos=True)
    assert out.finish_reason.value == "length" and out.prompt_tokens + out.completion_tokens == 16


def test_rope_config_old_and_new_formats():
    old = parse_rope({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new = parse_rope({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}})
    assert old == new and old.theta == 1e6 and old.rope_type == "linear"
    with pytest.raises(ModelLoadError, match="rope type 'mrope' is not supported"):
        parse_rope({"rope_scaling": {"type": "mrope"}})


def test_phi3_rope_in_its_old_and_new_formats():
    """Phi-3's first configs say `su` and keep the original context and partial factor beside rope_scaling."""
    factors = {"short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]}
    old = parse_rope({"max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                      "partial_rotary_factor": 0.75, "rope_scaling": {"type": "su", **factors}})
    new = parse_rope({"max_position_embeddings": 131072, "rope_parameters": {
        "rope_type": "longrope", "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
        **factors}})
    assert old == new
    assert (old.rope_type, old.factor, old.short_factor, old.long_factor) == ("longrope", 32.0, (1.0, 1.5), (2.0, 4.0))
    with pytest.raises(ModelLoadError, match="missing long_factor"):
        parse_rope({"max_position_embeddings": 4096, "rope_scaling": {"type": "longrope", "short_factor": [1.0]}})


@pytest.mark.parametrize(("raw", "windows"), [
    ({"model_type": "phi3", "sliding_window": 2047}, (2047, 2047, 2047)),
    ({"model_type": "mistral", "sliding_window": None}, ()),
    ({"model_type": "qwen3", "sliding_window": 1024, "use_sliding_window": False}, ()),
    ({"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": True, "max_window_layers": 2},
     (None, None, 1024)),
    ({"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": True,
      "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}, (1024, None, 1024)),
])
def test_sliding_windows_per_layer_and_the_context_they_leave_whole(raw, windows):
    """Older configs and transformers 5's `layer_types`; the cache still holds the model's whole context."""
    config = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 4096, **raw}
    model, context = meta_model(config)
    assert model.config.layer_windows == windows and context == 4096


@pytest.mark.parametrize("demo", ["demo-llama", "demo-t5"])
def test_loading_a_model_does_not_import_torch_compile(demo: str) -> None:
    """Models are built on the meta device; a random init there (nn.Embedding's `normal_`) would import
    torch._dynamo, 1.5 s of every start-up."""
    code = ("import sys; from vramlite.engine import Engine; from vramlite import models; "
            f"Engine.from_dir(models.path({demo!r}), device='cpu', dtype='fp32').generate('a', max_tokens=2); "
            "print('torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "False"
