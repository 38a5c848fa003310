"""POST /v1/embeddings with the official openai client (which asks for base64) and plain JSON, against the
engine's own embeddings of the same model."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.server.conftest import running_server
from vramlite import models as demo_models
from vramlite.engine import Engine

TEXTS = ["The quick brown fox", "床前明月光，疑是地上霜。", "x"]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return Engine.from_dir(tiny_llama_dir, device="cpu", dtype="fp32", max_batch_size=4)


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with running_server(tiny_llama_dir, served_model_name="model") as running:
        yield running


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_the_openai_client_gets_the_engines_embeddings(oai, reference):
    """The client asks for base64 (float32, little-endian) and decodes it; each input's vector, in order."""
    reply = oai.embeddings.create(model="model", input=TEXTS)
    assert [d.index for d in reply.data] == [0, 1, 2] and reply.model == "model"
    torch.testing.assert_close(torch.tensor([d.embedding for d in reply.data]), torch.tensor(reference.embed(TEXTS)),
                               atol=1e-6, rtol=0)
    tokens = sum(len(reference.tokenizer.encode(t)) for t in TEXTS)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens
    (one,) = oai.embeddings.create(model="model", input=TEXTS[1]).data
    # again, alone: its prompt's keys and values are cached now, so it is up to rounding
    torch.testing.assert_close(torch.tensor(one.embedding), torch.tensor(reply.data[1].embedding), atol=1e-5, rtol=0)


@pytest.mark.parametrize("given", [[5, 6, 7], [[5, 6, 7], [1, 9]]], ids=["ids", "lists-of-ids"])
def test_token_ids_as_json_floats(server, reference, given):
    reply = httpx.post(server.url + "/v1/embeddings", json={"input": given, "encoding_format": "float"})
    assert reply.status_code == 200, reply.text
    inputs = given if isinstance(given[0], list) else [given]
    got = torch.tensor([d["embedding"] for d in reply.json()["data"]])
    torch.testing.assert_close(got, torch.tensor(reference.embed(inputs)), atol=1e-6, rtol=0)
    assert reply.json()["usage"]["prompt_tokens"] == sum(map(len, inputs))


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"input": "x", "dimensions": 8}, 422, "dimensions"),
    ({"input": []}, 422, "input"),
    ({"input": "x", "model": "other"}, 404, "'other' is not served here"),
    ({"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
    ({"input": ["x"] * 13}, 422, "input: 13 inputs are more than this server holds at once"),
    ({"input": [1, 10**6]}, 400, "prompt token ids must be in 0..511"),
    ({"input": "word " * 200}, 400, "context"),
])
def test_bad_embedding_requests_are_refused_with_what_is_wrong(server, body, status, message):
    reply = httpx.post(server.url + "/v1/embeddings", json=body)
    assert reply.status_code == status and message in reply.json()["error"]["message"], reply.text


def test_info_tells_the_pooling_and_size(server):
    assert httpx.get(server.url + "/info").json()["embeddings"] == {"available": True, "pooling": "last",
                                                                    "dimensions": 64}


def test_a_model_without_embeddings_answers_400_and_says_so_in_info():
    with running_server(demo_models.path(demo_models.FILL_BLANK)) as t5:
        reply = httpx.post(t5.url + "/v1/embeddings", json={"input": "床前明月光"})
        assert reply.status_code == 400 and reply.json()["error"]["type"] == "unsupported_task"
        assert "decoder-only" in reply.json()["error"]["message"]
        assert httpx.get(t5.url + "/info").json()["embeddings"]["available"] is False
