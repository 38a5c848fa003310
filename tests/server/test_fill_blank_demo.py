"""`POST /fill_blank` on the shipped demo T5, served as the fill model beside a decoder-only model: 1, 3 and 16
blanks in Chinese and English, the text around the blanks kept to the byte, BMInf's positions, streaming, and a
reply that stays whole when the model's output is malformed."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import torch

import vramlite.engine.engine
from tests.server.conftest import Running, running_server
from tests.server.test_server_api import assert_error, sse_events
from vramlite import models as demo_models
from vramlite.server.runtime import fill_model_bytes, fill_model_dir, served_memory_limit
from vramlite.server.settings import Settings

DEMO_T5 = demo_models.path(demo_models.FILL_BLANK)
SPAN = "<span>"
PROMPTS = [
    "床前<span>光，疑是地上霜。",
    "白日依山尽，<span>入海流。欲穷千里目，<span>一层楼。<span>",
    "The best way to predict the <span> is to invent it.",
    "<span>, said the <span> to the <span>.",
    "".join(f"{char}<span>" for char in "春夏秋冬东南西北上下左右前后天地"),
    "".join(f"{number} <span>, " for number in range(1, 17)),
]


@pytest.fixture(scope="module")
def fill_server(tiny_llama_dir) -> Iterator[Running]:
    with running_server(tiny_llama_dir, fill_model=str(DEMO_T5)) as srv:
        yield srv


def bminf_positions(prompt: str) -> list[int]:
    """BMInf's rule: each blank's position is `find("<span>")` in the input, in order."""
    positions, start = [], 0
    while (i := prompt.find(SPAN, start)) >= 0:
        positions.append(i)
        start = i + len(SPAN)
    return positions


def check_reply(prompt: str, reply: dict) -> None:
    blanks = reply["blanks"]
    assert [b["index"] for b in blanks] == list(range(prompt.count(SPAN)))
    assert [b["position"] for b in blanks] == bminf_positions(prompt)
    pieces = prompt.split(SPAN)
    assert reply["text"] == pieces[0] + "".join(b["text"] + piece for b, piece in zip(blanks, pieces[1:],
                                                                                      strict=True))


def test_default_profile_fills_with_the_demo_t5_only_when_no_model_is_named(tmp_path):
    assert fill_model_dir(Settings()) == DEMO_T5
    assert fill_model_dir(Settings(model=str(tmp_path))) is None
    assert fill_model_dir(Settings(fill_model="none")) is None
    assert fill_model_dir(Settings(model=str(tmp_path), fill_model=str(DEMO_T5))) == DEMO_T5


@pytest.mark.parametrize("prompt", PROMPTS)
def test_blanks_are_filled_in_place(fill_server, prompt):
    with fill_server.client() as c:
        r = c.post("/fill_blank", json={"prompt": prompt, "max_tokens": 96, "temperature": 0})
    assert r.status_code == 200, r.text
    check_reply(prompt, r.json())


def test_stream_sends_each_blank_then_the_same_result_as_json(fill_server):
    body = {"prompt": PROMPTS[1], "max_tokens": 48, "temperature": 0.8, "seed": 5}
    with fill_server.client() as c:
        whole = c.post("/fill_blank", json=body).json()
        events = [e.data for e in sse_events(c, "/fill_blank", {**body, "stream": True})]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    *blanks, final = chunks
    assert blanks == whole["blanks"] and final == whole


@pytest.mark.parametrize("count", [0, 17])
def test_zero_or_seventeen_blanks_are_422(fill_server, count):
    r = httpx.post(fill_server.url + "/fill_blank", json={"prompt": "x" + SPAN * count})
    assert f"holds {count}" in assert_error(r, 422, "validation_error")


def test_info_names_the_fill_model(fill_server):
    info = httpx.get(fill_server.url + "/info").json()
    fill = fill_server.server.config.app.state.runtime.fill_loop.engine
    memory = info["fill_model"].pop("memory_bytes")
    assert info["fill_model"] == {"name": DEMO_T5.name, "path": str(DEMO_T5), "state": "ready", "type": "t5"}
    # What its memory plan counts: every weight and the KV cache it allocated, and a workspace.
    weights = sum(t.nbytes for t in (*fill.runner.model.parameters(), *fill.runner.model.buffers()))
    assert weights + fill.runner.cache.nbytes < memory < 2 * (weights + fill.runner.cache.nbytes)


def test_memory_limit_covers_the_fill_model(tiny_llama_dir):
    """The served model plans within what the fill model leaves of --memory-limit; a limit that does not
    even hold the fill model names it."""
    fill = fill_model_bytes(Settings(fill_model=str(DEMO_T5), device="cpu"), DEMO_T5)
    limit = fill + 16 * 2**20
    settings = Settings(model=str(tiny_llama_dir), fill_model=str(DEMO_T5), memory_limit=str(limit), device="cpu")
    assert served_memory_limit(settings) == limit - fill
    assert served_memory_limit(Settings(model=str(tiny_llama_dir), memory_limit=str(limit))) == limit
    with running_server(tiny_llama_dir, fill_model=str(DEMO_T5), memory_limit=str(limit)) as srv:
        rt = srv.server.config.app.state.runtime
        fill = fill_model_bytes(rt.settings, DEMO_T5)  # the server's batch size and step budget
        plan = rt.loop.engine.offload.plan
        assert plan.memory_limit == limit - fill and plan.device_bytes + fill <= limit
    with pytest.raises(ValueError, match=r"does not even hold the fill model demo-t5 .*--fill-model none"):
        served_memory_limit(Settings(fill_model=str(DEMO_T5), memory_limit=str(fill), device="cpu"))


def test_malformed_output_still_gives_a_whole_reply(fill_server, monkeypatch):
    """The model's output forced to: text before any sentinel, blank 2's sentinel, blank 0's again, then EOS."""
    with fill_server.client() as c:
        fill_engine = fill_server.server.config.app.state.runtime.fill_loop.engine
        vocab = fill_engine.tokenizer
        forced = iter([vocab.token_to_id("▁"), vocab.token_to_id("<extra_id_2>"), vocab.encode("月", False)[-1],
                       vocab.token_to_id("<extra_id_0>"), vocab.encode("风", False)[-1], 1])
        monkeypatch.setattr(vramlite.engine.engine.Sampler, "__call__",
                            lambda self, logits, states: torch.tensor([next(forced)]))
        prompt = "a<span>b<span>c<span>d"
        r = c.post("/fill_blank", json={"prompt": prompt, "max_tokens": 10})
    assert r.status_code == 200, r.text
    check_reply(prompt, r.json())


def test_generate_on_the_demo_t5_continues_the_prompt():
    """Served as the model itself, the T5 answers /generate (and the OpenAI route) by filling one blank at the
    prompt's end, as BMInf's CPM-2 did: the same text the engine writes for that blank."""
    prompt = "A fool and his money"
    with running_server(DEMO_T5) as srv, srv.client() as c:
        reply = c.post("/generate", json={"prompt": prompt, "max_tokens": 12, "temperature": 0})
        openai = c.post("/v1/completions", json={"model": DEMO_T5.name, "prompt": prompt, "max_tokens": 12,
                                                 "temperature": 0})
        engine_ = srv.server.config.app.state.runtime.loop.engine
    assert reply.status_code == 200 and openai.status_code == 200, reply.text
    filled = engine_.generate(prompt, max_tokens=12, temperature=0)
    assert reply.json()["text"] == openai.json()["choices"][0]["text"] == filled.text
    assert reply.json()["usage"]["prompt_tokens"] == filled.prompt_tokens == len(engine_.encode(prompt))
