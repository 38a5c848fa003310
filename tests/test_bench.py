"""`vramlite bench` and `vramlite.engine.bench`: real runs on the demo model and on a tiny LLaMA streamed from host
memory."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("pydantic")  # not on a GPU host with only the engine's packages: see conftest

from tests.conftest import save_tiny_llama
from vramlite import models as demo_models
from vramlite.engine import Engine
from vramlite.engine.bench import bench
from vramlite.engine.loader import load_model
from vramlite.server.cli import main


@pytest.fixture(scope="module")
def demo() -> Engine:
    return Engine.from_dir(demo_models.path(), device="cpu", dtype="fp32", max_batch_size=4, context=64)


def test_bench_counts_the_steps_and_leaves_the_engine_idle(demo):
    result = bench(demo, batch=3, prompt_tokens=10, new_tokens=5)
    assert (result.batch, result.prompt_tokens, result.new_tokens, result.decode_steps) == (3, 10, 5, 4)
    assert result.decoded_tokens == 3 * 4
    assert result.prefill_seconds > 0 and result.decode_seconds > 0
    assert result.decode_tokens_per_second == pytest.approx(3 * 4 / result.decode_seconds)
    assert result.prefill_tokens_per_second == pytest.approx(3 * 10 / result.prefill_seconds)
    assert result.h2d_bytes == 0 and result.peak_device_bytes == 0  # resident, on the CPU
    assert not demo.has_unfinished()
    slots = [demo.runner.cache.allocate()[0] for _ in range(4)]  # every slot is free again
    for slot in slots:
        demo.runner.cache.free(slot)


def test_bench_refuses_what_it_cannot_run(demo):
    with pytest.raises(ValueError, match="at least 2"):
        bench(demo, 1, 4, 1)
    with pytest.raises(ValueError, match="max_batch_size 4"):
        bench(demo, 5, 4, 3)


def test_streamed_bytes_per_step_are_the_plans_whatever_the_batch(tmp_path, spm_tokenizer_dir):
    """Each decode step copies every streamed layer once, shared by the whole batch."""
    model_dir = save_tiny_llama(tmp_path / "llama", spm_tokenizer_dir, num_hidden_layers=6)
    model, _ = load_model(model_dir, torch.device("cpu"), torch.float32, memory_limit=2**40, max_batch_size=4,
                          context=64)
    plan = model.offload.plan
    limit = plan.device_bytes - plan.resident_bytes + 4 * max(plan.layer_bytes)
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=4, context=64, memory_limit=limit)
    streamed = engine.offload.plan.streamed_bytes
    assert len(engine.offload.plan.streamed) >= 2
    for batch in (1, 4):
        result = bench(engine, batch, 8, 4)
        assert result.h2d_bytes == result.decode_steps * streamed
        assert result.h2d_bytes_per_step == streamed


def test_cli_prints_a_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--dtype", "fp32", "--batch", "1", "2", "--prompt-len", "8",
                 "--tokens", "4", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "demo-llama" in lines[0] and "llama, 6 layers" in lines[0]
    assert lines[1].split()[:4] == ["batch", "prompt", "new", "prefill"]
    assert [line.split()[:3] for line in lines[2:]] == [["1", "8", "4"], ["2", "8", "4"]]
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    assert all(r["decode_tokens_per_second"] > 0 and r["decode_steps"] == 3 for r in report["rows"])
    assert report["hardware"]["torch"] == torch.__version__ and report["device"]["device"] == "cpu"
    assert report["plan"] is None and report["weights"] == "float32"


def test_encoder_decoder_counts_the_tokens_it_decoded():
    """The demo T5 continues each prompt as a blank and may stop at a sentinel: only real tokens count."""
    engine = Engine.from_dir(demo_models.path(demo_models.FILL_BLANK), device="cpu", dtype="fp32", max_batch_size=2,
                             context=64)
    result = bench(engine, batch=2, prompt_tokens=12, new_tokens=6)
    assert 0 < result.decoded_tokens <= 2 * 5 and 0 < result.decode_steps <= 5
    assert result.decode_tokens_per_second == pytest.approx(result.decoded_tokens / result.decode_seconds)
