"""Shared fixtures, the `gpu` marker's skip rule, and which packages a host may lack."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# A GPU host may have only the engine's packages (torch, triton, transformers, ...), not the server's nor the CPM
# tokenizers' jieba: the test modules and folders that import these skip there (`pytest.importorskip`), so that
# `pytest -m gpu` collects. Under CI, which installs every extra, a missing one is an error instead.
SKIPPABLE_PACKAGES = ("fastapi", "pydantic", "jieba", "rjieba", "peft")


def pytest_sessionstart(session: pytest.Session) -> None:
    missing = [name for name in SKIPPABLE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing and os.environ.get("CI"):
        raise pytest.UsageError(f"CI must run every test, but {', '.join(missing)} is not installed "
                                "(pip install -e '.[test]')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TEXT = """The quick brown fox jumps over the lazy dog. A fortune cookie says: you will write tests.
Hello, world! Numbers 12345 and 67890. Whitespace   runs and\ttabs.
床前明月光，疑是地上霜。举头望明月，低头思故乡。
白日依山尽，黄河入海流。欲穷千里目，更上一层楼。
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
"""


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny sentencepiece BPE tokenizer (LLaMA conventions: unk 0, bos 1, eos 2) in an HF layout."""
    import json

    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    corpus = d / "corpus.txt"
    corpus.write_text(TEXT * 3, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), model_type="bpe", vocab_size=512,
        character_coverage=1.0, normalization_rule_name="identity", byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    corpus.unlink()
    (d / "tokenizer.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
    }))
    return d


STARCODER_FIM_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]


@pytest.fixture(scope="session")
def fim_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, spm_tokenizer_dir):
    """The test tokenizer as a tokenizer.json with StarCoder's fill-in-the-middle tokens (ids 512 to 516)."""
    import transformers as tf

    tokenizer = tf.AutoTokenizer.from_pretrained(spm_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": STARCODER_FIM_TOKENS})
    d = tmp_path_factory.mktemp("fim-tokenizer")
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def fim_llama_dir(tmp_path_factory: pytest.TempPathFactory, fim_tokenizer_dir):
    """A tiny random LLaMA whose tokenizer has StarCoder's fill-in-the-middle tokens."""
    return save_tiny_llama(tmp_path_factory.mktemp("fim-llama"), fim_tokenizer_dir, vocab_size=520)


TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)


def save_tiny_llama(out_dir, tokenizer_dir, **config):
    """A random LLaMA (TINY_LLAMA with `config` over it, seed 0) saved with the test tokenizer in HF format."""
    import transformers as tf

    torch.manual_seed(0)
    return save_tiny_model(tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY_LLAMA, **config})), out_dir, tokenizer_dir)


def save_tiny_model(model, out_dir, tokenizer_dir, **save_kwargs):
    """Save an HF model next to a copy of the tokenizer files: a complete HF-format directory."""
    import shutil

    model.save_pretrained(out_dir, **save_kwargs)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out_dir / f.name)
    return out_dir
