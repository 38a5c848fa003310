"""The daemon refuses to start on a model it cannot load, and says what to fix: the file and tensor of a
broken checkpoint, the memory budget that fits after a CUDA out-of-memory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import vramlite.engine.engine
from vramlite.engine.errors import LoadOutOfMemoryError
from vramlite.server.serve import serve
from vramlite.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def broken_dir(tmp_path, tiny_llama_dir) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, out)
    return out


def serve_in_thread(settings: Settings) -> int:
    """`serve` as `vramlite serve` runs it, on a free port; returns its exit status."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(serve(settings, sock)), daemon=True)
    thread.start()
    thread.join(60)
    sock.close()
    assert status, "serve did not return"
    return status[0]


def test_truncated_weights_exit_naming_file_and_tensor(broken_dir):
    weights = broken_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    env = {**os.environ, "VRAMLITE_DEVICE": "cpu", "VRAMLITE_PORT": "0"}
    proc = subprocess.run([sys.executable, "-m", "vramlite.server.cli", "serve", "--model", str(broken_dir)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{weights} is not a readable safetensors file" in proc.stderr
    assert "the file is truncated" in proc.stderr and "model.layers." in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_config_that_lies_about_shapes_refuses_to_start(broken_dir, caplog):
    config = json.loads((broken_dir / "config.json").read_text())
    config["intermediate_size"] += 8
    (broken_dir / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.ERROR, logger="vramlite.server"):
        assert serve_in_thread(Settings(model=str(broken_dir), device="cpu", log_level="WARNING")) == 1
    assert "tensor 'model.layers.0.mlp.gate_proj.weight' in model.safetensors has shape" in caplog.text
    assert "event=exit status=1" in caplog.text


def test_cuda_out_of_memory_at_start_exits_naming_the_budget(tiny_llama_dir, monkeypatch, caplog):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(vramlite.engine.engine, "load_model", oom)
    with caplog.at_level(logging.ERROR, logger="vramlite.server"):
        status = serve_in_thread(Settings(model=str(tiny_llama_dir), device="cpu", memory_limit="8GiB",
                                          log_level="WARNING"))
    assert status == 1
    assert "out of GPU memory loading" in caplog.text and "memory_limit 8.00 GiB" in caplog.text
    assert "--memory-limit" in caplog.text and "Tried to allocate 2.00 GiB" in caplog.text


def test_out_of_memory_advice_names_a_budget_that_fits():
    error = LoadOutOfMemoryError("/models/llama-7b", torch.cuda.OutOfMemoryError("CUDA out of memory."),
                                 free=int(5.5 * 2**30), total=6 * 2**30, memory_limit=None)
    assert error.suggested_limit == int(4.75 * 2**30)  # 90% of what was free, in quarter GiB
    assert "5.50 GiB free of 6.00 GiB" in str(error) and "--memory-limit 4.75GiB" in str(error)
    assert "no memory_limit" in str(error)
