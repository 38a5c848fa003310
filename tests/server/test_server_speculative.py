"""A server that speculates (`--speculative-tokens`) answers greedy requests as one that does not, streamed or
not, drafting while at most `--speculative-max-batch` sequences run, and exports how many drafted tokens it
checked and kept."""

from __future__ import annotations

import json
import re

from httpx_sse import connect_sse

from tests.server.conftest import running_server


def test_speculating_server_answers_as_a_plain_one_and_counts_its_drafts(tiny_llama_dir):
    body = {"prompt": "one two three one two three one two", "max_tokens": 40, "temperature": 0}
    with (running_server(tiny_llama_dir, speculative_tokens=4, speculative_max_batch=2) as fast,
          running_server(tiny_llama_dir) as plain,
          fast.client() as c, plain.client() as p):
        want = p.post("/generate", json=body).json()["text"]
        assert c.post("/generate", json=body).json()["text"] == want
        with connect_sse(c, "POST", "/generate", json={**body, "stream": True}) as source:
            events = [json.loads(e.data) for e in source.iter_sse() if e.data != "[DONE]"]
        assert events[-1]["text"] == want == "".join(e["token"]["text"] for e in events if "token" in e)
        metrics = c.get("/metrics").text
        assert c.get("/info").json()["speculative"] == {"tokens": 4, "max_batch": 2}
        assert fast.loop.engine.speculative_max_batch == 2
    drafted, kept = (float(re.search(rf"^vramlite_speculative_{name}_tokens_total (\S+)$", metrics, re.M)[1])
                     for name in ("draft", "accepted"))
    assert drafted >= kept > 0
