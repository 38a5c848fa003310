"""The daemon under a memory limit: /info shows the plan, /metrics the transfers, output is unchanged."""

from __future__ import annotations

import logging
import re

import pytest

import vramlite.engine.offload.weight_store
from tests.conftest import save_tiny_llama
from tests.server.conftest import CONTEXT, running_server
from vramlite.engine import Engine


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


def test_refused_pinning_falls_back_to_pageable_with_a_warning_and_a_metric(four_layer_dir, monkeypatch, caplog):
    body = {"prompt": "床前明月光", "max_tokens": 12, "temperature": 0}
    budget = smallest_budget(four_layer_dir)
    with running_server(four_layer_dir, memory_limit=str(budget)) as server, server.client() as c:
        pinned_answer = c.post("/generate", json=body).json()
        assert server.metric("vramlite_host_pinned_fallback") == 0
    # cudaHostRegister answering cudaErrorMemoryAllocation, as on a host short of lockable memory.
    monkeypatch.setattr(vramlite.engine.offload.weight_store, "host_register", lambda device: lambda ptr, nbytes: 2)
    with caplog.at_level(logging.WARNING, logger="vramlite.engine.offload"), \
            running_server(four_layer_dir, memory_limit=str(budget)) as server, server.client() as c:
        assert c.post("/generate", json=body).json() == pinned_answer
        assert server.metric("vramlite_host_pinned_fallback") == 1
        assert server.metric("vramlite_host_pinned_bytes") == 0
        assert server.metric("vramlite_pcie_h2d_bytes_total") > 0
    assert "could not pin" in caplog.text and "pageable" in caplog.text
