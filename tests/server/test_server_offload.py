"""The daemon under a memory limit: /info shows the plan, /metrics the transfers, output is unchanged."""

from __future__ import annotations

import re

import pytest

from engine import Engine
from tests.conftest import save_tiny_llama
from tests.server.conftest import CONTEXT, running_server


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("four-layers"), spm_tokenizer_dir, num_hidden_layers=4)


def smallest_budget(model_dir) -> int:
    """The budget the planner names when asked for too little: every layer streamed."""
    with pytest.raises(ValueError, match="smallest budget that works") as err:
        Engine.from_dir(model_dir, device="cpu", context=CONTEXT, max_batch_size=4, memory_limit=1)
    return int(re.search(r"= (\d+) bytes", str(err.value)).group(1))


def test_offloaded_server_streams_layers_and_answers_the_same(four_layer_dir):
    body = {"prompt": "床前明月光", "max_tokens": 12, "temperature": 0}
    with running_server(four_layer_dir) as server, server.client() as c:
        resident = c.post("/generate", json=body).json()
    budget = smallest_budget(four_layer_dir)
    with running_server(four_layer_dir, memory_limit=str(budget)) as server, server.client() as c:
        info = c.get("/info").json()
        assert info["memory_limit"] == {"requested": str(budget), "bytes": budget, "active": True}
        assert info["offload"]["streamed_layers"] == [0, 1, 2, 3] and info["offload"]["num_slots"] == 2
        assert c.post("/generate", json=body).json() == resident
        assert server.metric("vramlite_offload_streamed_layers") == 4
        assert server.metric("vramlite_offload_resident_layers") == 0
        moved = server.metric("vramlite_pcie_h2d_bytes_total")
        assert moved > 0
        c.post("/generate", json=body)
        assert server.metric("vramlite_pcie_h2d_bytes_total") > moved
