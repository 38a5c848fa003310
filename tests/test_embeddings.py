"""Embeddings in the engine: the model's pooling, prefix reuse, batching with generation, refusals. Each family
against transformers is in test_models.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.conftest import save_tiny_llama
from vramlite import models as demo_models
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.pooling import model_pooling

PROMPT = [1, *range(40, 70)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), spm_tokenizer_dir)


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=3, max_tokens_per_step=16)


def sentence_transformers_pooling(model_dir, **modes: bool) -> None:
    (model_dir / "1_Pooling").mkdir(exist_ok=True)
    (model_dir / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **modes}))


def test_the_pooling_is_the_model_directorys_own(tmp_path, model_dir, engine):
    """sentence-transformers' pooling config, where there is one: an engine pools as it says by default."""
    assert model_pooling(tmp_path) == "last"
    for key, method in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "first"),
                        ("pooling_mode_lasttoken", "last")):
        sentence_transformers_pooling(tmp_path, **{key: True, "pooling_mode_max_tokens": False})
        assert model_pooling(tmp_path) == method
    sentence_transformers_pooling(tmp_path, pooling_mode_lasttoken=False, pooling_mode_max_tokens=True)
    with pytest.raises(ValueError, match="pooling pooling_mode_max_tokens is not supported"):
        model_pooling(tmp_path)
    copy = shutil.copytree(model_dir, tmp_path / "mean-pooled")
    sentence_transformers_pooling(copy, pooling_mode_mean_tokens=True)
    mean_engine = Engine.from_dir(copy, device="cpu", dtype="fp32", max_batch_size=1)
    assert mean_engine.embed([PROMPT]) == engine.embed([PROMPT], "mean") != engine.embed([PROMPT])


def test_embeddings_are_unit_vectors_and_differ_by_prompt_and_pooling(engine):
    vectors = torch.tensor(engine.embed(["The quick brown fox", "床前明月光", [1, 7, 9]]))
    assert vectors.shape == (3, 64)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3))
    assert len({tuple(v) for v in vectors.tolist()}) == 3
    assert engine.embed(["x y"], "first") != engine.embed(["x y"], "mean")


def test_last_token_pooling_reuses_a_cached_prefix_and_mean_pooling_computes_every_token(engine, model_dir):
    fresh = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1, prefix_caching=False)
    engine.generate(PROMPT, SamplingParams(max_tokens=1, temperature=0))  # the cache holds PROMPT
    for pooling, reused in (("mean", 0), ("last", len(PROMPT) - 1)):
        before = engine.scheduler.reused_tokens
        ours = engine.embed([PROMPT], pooling)
        assert engine.scheduler.reused_tokens - before == reused
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(fresh.embed([PROMPT], pooling)), atol=1e-5,
                                   rtol=0)


def test_an_embedding_batched_with_generations_leaves_them_as_they_are_alone(engine):
    sampled = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    alone = engine.generate("Once upon", sampled).token_ids
    (embedding,) = engine.embed([PROMPT], "mean")
    ids = [engine.add_request("Once upon", sampled), engine.add_request(PROMPT, engine.embedding_params("mean"))]
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert [o.token_id for o in outputs if o.seq_id == ids[0]] == alone
    (done,) = [o for o in outputs if o.seq_id == ids[1]]
    assert done.finished and done.token_id is None
    torch.testing.assert_close(torch.tensor(done.embedding), torch.tensor(embedding), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(pooling="max"), "pooling must be None, or one of last, mean, first with max_tokens 0"),
    (dict(pooling="last"), "with max_tokens 0"),  # max_tokens left at its default
])
def test_bad_pooling_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_an_encoder_decoder_model_has_no_embeddings():
    t5 = Engine.from_dir(demo_models.path(demo_models.FILL_BLANK), device="cpu", max_batch_size=1)
    with pytest.raises(ValueError, match="embeddings come from decoder-only models"):
        t5.embed(["床前明月光"])
    assert not t5.has_unfinished()
