"""Serving a model with a LoRA adapter merged at load: the setting, /info, and the served text."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from tests.server.conftest import CONTEXT, running_server
from vramlite.engine import Engine
from vramlite.engine.errors import ModelLoadError
from vramlite.server.cli import build_parser, lora_adapters
from vramlite.server.runtime import engine_loader
from vramlite.server.settings import Settings, load_settings

peft = pytest.importorskip("peft")

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama_dir):
    """A PEFT adapter of the tiny LLaMA's shapes, large enough to change its greedy text."""
    torch.manual_seed(3)
    model = tf.LlamaForCausalLM(tf.AutoConfig.from_pretrained(tiny_llama_dir))
    lora = peft.LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    out = tmp_path_factory.mktemp("adapter")
    peft.get_peft_model(model, lora).save_pretrained(out)
    return out


def test_adapters_come_from_flags_env_or_a_profile(tmp_path):
    env = {"VRAMLITE_LORA": "adapters/a, adapters/b:0.5"}
    assert load_settings({}, env, "default").lora_adapters == [("adapters/a", 1.0), ("adapters/b", 0.5)]
    profile = tmp_path / "p.toml"
    profile.write_text('lora = ["adapters/c:2"]\n')
    assert load_settings({}, {}, profile).lora_adapters == [("adapters/c", 2.0)]
    args = build_parser().parse_args(["generate", "--lora", "x:0.25", "--lora", "y", "hi"])
    assert lora_adapters(args.lora) == [("x", 0.25), ("y", 1.0)]


def test_the_server_answers_with_the_adapted_model(tiny_llama_dir, adapter):
    def greedy(lora) -> str:
        engine = Engine.from_dir(tiny_llama_dir, device="cpu", context=CONTEXT, max_batch_size=1, lora=lora)
        return engine.generate(PROMPT, engine.sampling_params(max_tokens=12, temperature=0)).text

    adapted = greedy([(adapter, 0.5)])
    assert adapted != greedy(())
    with running_server(tiny_llama_dir, lora=f"{adapter}:0.5") as srv, srv.client() as client:
        assert client.get("/info").json()["lora"] == [{"path": str(adapter), "scale": 0.5}]
        body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        assert client.post("/generate", json=body).json()["text"] == adapted


def test_the_served_model_loads_with_the_adapters_and_the_fill_model_without(tiny_llama_dir, tmp_path):
    settings = Settings(model=str(tiny_llama_dir), device="cpu", lora=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match=r"LoRA adapter directory .*missing does not exist"):
        engine_loader(settings)()
    assert engine_loader(settings, tiny_llama_dir)().model_dir == tiny_llama_dir
