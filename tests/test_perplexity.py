"""vramlite.engine.perplexity and `vramlite perplexity`: the model's own log-likelihood of texts, window by window,
against transformers on the same weights."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import save_tiny_llama
from vramlite import models
from vramlite.engine import Engine
from vramlite.engine.perplexity import perplexity, windows

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 6, "床前明月光，疑是地上霜。举头望明月，低头思故乡。"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), spm_tokenizer_dir, max_position_embeddings=128)


def reference_nll(model_dir, chunks: list[list[int]]) -> tuple[float, int]:
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in chunks:
            logits = hf(torch.tensor([ids])).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
            count += len(ids) - 1
    return nll, count


def test_windows_cover_every_token_once():
    assert windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a last window of one token scores nothing


@pytest.mark.parametrize("context", [128, 24])  # each text in one window, or cut into several
def test_perplexity_is_the_reference_models(model_dir, context):
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=3, context=context)
    got = perplexity(engine, TEXTS)
    chunks = [w for text in TEXTS for w in windows(engine.encode(text), context - 1)]
    assert (len(chunks) > len(TEXTS)) is (context == 24)
    nll, count = reference_nll(model_dir, chunks)
    assert got.tokens == count
    assert got.nll == pytest.approx(nll, rel=1e-5)
    assert got.value == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_command_prints_the_perplexity(model_dir, tmp_path, capsys):
    pytest.importorskip("pydantic")  # not on a GPU host with only the engine's packages: see conftest
    from vramlite.server.cli import main

    files = []
    for i, text in enumerate(TEXTS):
        files.append(tmp_path / f"{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    assert main(["perplexity", "--model", str(model_dir), "--device", "cpu", "--dtype", "fp32", "--context", "64",
                 *map(str, files)]) == 0
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", context=64)
    want = perplexity(engine, TEXTS)
    out = capsys.readouterr().out
    assert f"perplexity {want.value:.4f} over {want.tokens} tokens" in out and "windows of 63 tokens" in out


def test_an_encoder_decoder_has_no_perplexity_here():
    t5 = Engine.from_dir(models.path(models.FILL_BLANK), device="cpu", max_batch_size=1)
    with pytest.raises(ValueError, match="left to right"):
        perplexity(t5, TEXTS)
