"""The HTTP contract end to end against a real uvicorn: routes, bodies, SSE framing, errors."""

from __future__ import annotations

import json

import httpx
import pytest
from httpx_sse import connect_sse

from vramlite.server.schemas import MAX_BLANKS

GREEDY = {"temperature": 0, "max_tokens": 12}


def sse_events(client: httpx.Client, path: str, body: dict) -> list:
    with connect_sse(client, "POST", path, json=body) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return list(source.iter_sse())


def assert_error(response: httpx.Response, status: int, type_: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == type_
    return body["error"]["message"]


def test_health_and_info(client):
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["state"] == "ready"
    assert info["model"]["type"] == "llama" and info["model"]["layers"] == 2 and info["model"]["context"] == 128
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["offload"] == {"resident_layers": [0, 1], "streamed_layers": []}
    assert info["quantization"] == {"requested": None, "active": None}
    assert {"memory_limit", "version", "limits"} <= set(info)
    assert client.get("/docs").status_code == 200
    assert "/generate" in client.get("/openapi.json").json()["paths"]


def test_generate_json(client):
    r = client.post("/generate", json={"prompt": "The quick brown fox", **GREEDY})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "stopped", "finish_reason", "usage"}
    assert body["finish_reason"] in ("length", "eos")
    assert body["stopped"] == (body["finish_reason"] != "length")
    assert body["usage"]["prompt_tokens"] > 1 and 1 <= body["usage"]["completion_tokens"] <= 12
    assert r.headers["x-request-id"]


def test_generate_sse_framing_and_same_text_as_json(client):
    body = {"prompt": "Hello, world!", "max_tokens": 10, "temperature": 0.9, "top_n": 50, "seed": 7}
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        raw = r.read().decode()
    assert raw.startswith("data: {") and raw.endswith("data: [DONE]\n\n")
    assert "\r" not in raw
    events = sse_events(client, "/generate", {**body, "stream": True})
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(e.data) for e in events[:-1]]
    tokens, final = chunks[:-1], chunks[-1]
    assert [c["index"] for c in tokens] == list(range(len(tokens)))
    assert all(set(c) == {"index", "token"} and set(c["token"]) == {"id", "text"} for c in tokens)
    assert set(final) == {"finish_reason", "text", "usage"}
    assert final["text"] == "".join(c["token"]["text"] for c in tokens)
    assert final["usage"]["completion_tokens"] == len(tokens)
    plain = client.post("/generate", json=body).json()
    assert plain["text"] == final["text"] and plain["finish_reason"] == final["finish_reason"]


@pytest.mark.parametrize("body, where", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "top_k": "many"}, "top_k"),
    ({"prompt": "x", "tempreature": 1}, "tempreature"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "max_tokens": 129}, "context"),
])
def test_validation_errors_have_our_body(client, body, where):
    assert where in assert_error(client.post("/generate", json=body), 422, "validation_error")


def test_not_json_is_422(client):
    r = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422, "validation_error")


def test_unknown_route_and_method(client):
    assert "/nope" in assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/generate"), 405, "method_not_allowed")


def test_body_too_large(client):
    r = client.post("/generate", json={"prompt": "x" * (2 << 20)})
    assert_error(r, 413, "request_too_large")


def test_prompt_too_long_names_both_numbers(client):
    message = assert_error(client.post("/generate", json={"prompt": "fox " * 200}), 400, "prompt_too_long")
    assert "128" in message and "tokens" in message


def test_fill_blank(client):
    r = client.post("/fill_blank", json={"prompt": "今天<span>，我们<span>。"})
    assert "decoder-only" in assert_error(r, 400, "unsupported_task")
    assert_error(client.post("/fill_blank", json={"prompt": "no blanks"}), 422, "validation_error")
    too_many = "<span>" * (MAX_BLANKS + 1)
    assert_error(client.post("/fill_blank", json={"prompt": too_many}), 422, "validation_error")


def test_chunked_body_too_large(client):
    chunks = (b'{"prompt": "' + b"x" * 65536 for _ in range(32))
    assert_error(client.post("/generate", content=chunks, headers={"content-type": "application/json"}),
                 413, "request_too_large")


def test_generate_logprobs_json_and_stream_agree_with_the_engine(client, tiny_llama_dir):
    """One entry per generated token, each the engine's (the model's distribution), the same streamed."""
    from vramlite.engine import Engine

    body = {"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0, "logprobs": 3}
    done = client.post("/generate", json=body).json()
    tokens = done["logprobs"]
    assert len(tokens) == done["usage"]["completion_tokens"]
    engine = Engine.from_dir(tiny_llama_dir, device="cpu", context=128)
    want = engine.generate(body["prompt"], engine.sampling_params(max_tokens=6, temperature=0, logprobs=3)).logprobs
    for got, ref in zip(tokens, want, strict=True):
        assert got["id"] == ref.chosen.token_id and got["text"] == ref.chosen.text
        assert got["logprob"] == pytest.approx(ref.chosen.logprob, abs=1e-5)
        assert [t["id"] for t in got["top"]] == [t.token_id for t in ref.top]
    # streamed: the prompt's keys and values now come from the prefix cache, equal up to rounding
    streamed = [json.loads(e.data)["logprobs"] for e in sse_events(client, "/generate", {**body, "stream": True})
                if e.data != "[DONE]" and "index" in json.loads(e.data)]
    assert [(t["id"], t["text"]) for t in streamed] == [(t["id"], t["text"]) for t in tokens]
    assert [t["logprob"] for t in streamed] == pytest.approx([t["logprob"] for t in tokens], abs=1e-5)
    assert "logprobs" not in client.post("/generate", json={**body, "logprobs": None}).json()


@pytest.mark.parametrize("bad", [-1, 21, "3"])
def test_generate_logprobs_out_of_range_is_422(client, bad):
    message = assert_error(client.post("/generate", json={"prompt": "x", "logprobs": bad}), 422, "validation_error")
    assert message.startswith("logprobs: ")


def test_generate_prompt_logprobs_score_a_prompt(client):
    body = {"prompt": "The quick brown fox", "max_tokens": 0, "prompt_logprobs": 1}
    done = client.post("/generate", json=body).json()
    scored = done["prompt_logprobs"]
    assert len(scored) == done["usage"]["prompt_tokens"] and scored[0] is None
    assert all(len(t["top"]) == 1 and t["top"][0]["logprob"] >= t["logprob"] for t in scored[1:])
    assert done["usage"]["completion_tokens"] == 0 and done["text"] == ""
    events = [json.loads(e.data) for e in sse_events(client, "/generate", {**body, "max_tokens": 2,
                                                                            "stream": True})[:-1]]
    assert events[0] == {"prompt_logprobs": scored} and "index" in events[1]


def test_tokenize_and_detokenize_round_trip(client, tiny_llama_dir):
    from vramlite.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tiny_llama_dir)
    r = client.post("/tokenize", json={"prompt": "The quick brown fox"}).json()
    assert r["tokens"] == tokenizer.encode("The quick brown fox") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128
    bare = client.post("/tokenize", json={"prompt": "The quick brown fox", "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode("The quick brown fox", add_special_tokens=False)
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "The quick brown fox"}
    message = assert_error(client.post("/detokenize", json={"tokens": [1, 10**6]}), 400, "invalid_request")
    assert message.startswith("token ids must be in 0..")
    assert_error(client.post("/tokenize", json={"text": "x"}), 422, "validation_error")


def test_a_stop_string_may_come_alone(client):
    body = {"prompt": "The quick brown fox", "max_tokens": 12, "temperature": 0}
    text = client.post("/generate", json=body).json()["text"]
    stop = text[len(text) // 2 :][:2]
    alone, listed = (client.post("/generate", json={**body, "stop": s}).json() for s in (stop, [stop]))
    assert alone == listed and alone["finish_reason"] == "stop" and stop not in alone["text"]


def test_a_repeated_prompt_is_a_prefix_cache_hit(server, client):
    body = {"prompt": "A prompt sent twice, as a chat resends its history", "max_tokens": 2, "temperature": 0}
    first = client.post("/generate", json=body).json()
    before = server.metric("vramlite_prefix_cache_hit_tokens_total")
    second = client.post("/generate", json=body).json()
    assert first["text"] == second["text"]
    hits = server.metric("vramlite_prefix_cache_hit_tokens_total") - before
    assert hits == first["usage"]["prompt_tokens"] - 1  # all but the last prompt token, whose logits are needed
