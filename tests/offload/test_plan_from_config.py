"""`vramlite plan`: the memory plan from a config.json alone, the same plan loading makes, and its table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("pydantic")  # not on a GPU host with only the engine's packages: see conftest

from tests.conftest import save_tiny_llama
from vramlite.engine import Engine
from vramlite.engine.loader import plan_from_config
from vramlite.server.cli import main

LLAMA_7B = Path(__file__).resolve().parents[2] / "configs" / "models" / "llama-2-7b"
GiB = 2**30


def test_llama_7b_int8_sizes_come_from_the_shapes():
    plan, cfg, context = plan_from_config(LLAMA_7B, torch.float16, "5GiB", "int8", max_batch_size=1, context=2048,
                                          h2d_bandwidth=12e9)
    assert (cfg.num_layers, cfg.hidden_size, context) == (32, 4096, 2048)
    h, i = 4096, 11008
    int8_weights = 4 * h * h + 3 * h * i  # q, k, v, o and gate, up, down: one byte per weight
    scales = 4 * (4 * h + 2 * i + h)  # one fp32 scale per output channel
    norms = 2 * 2 * h  # two fp16 RMSNorm weights
    assert all(int8_weights + scales + norms <= n <= int8_weights + scales + norms + 4096 for n in plan.layer_bytes)
    assert plan.kv_bytes == 2 * 32 * 1 * 32 * 2048 * 128 * 2
    # The LM head in int8 (one fp32 scale a row) takes VRAM; the fp16 embedding stays in host memory.
    assert 32000 * h + 4 * 32000 <= plan.fixed_bytes < 32000 * h + 4 * 32000 + 2**20
    assert plan.host_fixed_bytes == 32000 * h * 2
    assert plan.device_bytes <= 5 * GiB and plan.streamed and plan.resident
    assert plan.decode_seconds == pytest.approx(plan.streamed_bytes / 12e9)
    fp16, _, _ = plan_from_config(LLAMA_7B / "config.json", torch.float16, "5GiB", None, 1, 2048)
    assert fp16.layer_bytes[0] > 1.9 * plan.layer_bytes[0] and len(fp16.streamed) > len(plan.streamed)


def test_a_context_left_unset_shortens_to_what_the_limit_holds(caplog):
    """The 7B's 4096 positions of KV cache do not fit beside its weights in 2 GiB: the plan takes the longest
    context that does, and says so; a context asked for is not shortened, the error names one that fits."""
    plan, _, context = plan_from_config(LLAMA_7B, torch.float16, "2GiB", "int8")
    assert 256 <= context < 4096 and plan.device_bytes <= 2 * GiB
    assert f"context {context}: the most positions the memory limit leaves room for" in caplog.text
    with pytest.raises(ValueError, match=f"; a context of {context} positions fits"):
        plan_from_config(LLAMA_7B, torch.float16, "2GiB", "int8", context=context + 1)
    with pytest.raises(ValueError, match="smallest budget that works"):  # not even 256 positions fit
        plan_from_config(LLAMA_7B, torch.float16, "600MiB", "int8")


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory, spm_tokenizer_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("plan-four"), spm_tokenizer_dir, num_hidden_layers=4)


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_config_plan_is_the_plan_loading_makes(four_layer_dir, quantize):
    kwargs = {"max_batch_size": 2, "context": 64, "max_tokens_per_step": 32}
    budget = plan_from_config(four_layer_dir, torch.float32, 10**9, quantize, **kwargs)[0]
    limit = budget.device_bytes - budget.resident_bytes + budget.layer_bytes[0] * 3  # some layers must stream
    planned, _, _ = plan_from_config(four_layer_dir, torch.float32, limit, quantize, **kwargs)
    engine = Engine.from_dir(four_layer_dir, device="cpu", quantize=quantize, memory_limit=limit, **kwargs)
    assert planned.streamed and planned.as_dict() == engine.offload.plan.as_dict()


def test_plan_command_prints_the_table(capsys):
    code = main(["plan", "--model", str(LLAMA_7B), "--quantize", "int8", "--memory-limit", "5GiB",
                 "--context", "2048", "--max-batch-size", "2", "--dtype", "fp16", "--pcie-gbps", "12"])
    out = capsys.readouterr().out
    assert code == 0
    plan, _, _ = plan_from_config(LLAMA_7B, torch.float16, "5GiB", "int8", 2, 2048, h2d_bandwidth=12e9)
    for part in ("KV cache", "workspace", "swap slots", "host pinned", "resident layers", "streamed layers"):
        assert part in out
    assert f"{len(plan.resident)} of 32" in out and f"{len(plan.streamed)} of 32" in out
    bound = re.search(r"decode bound\s+([\d.]+) ms per step = ([\d.]+) tokens/s per sequence", out)
    assert float(bound.group(1)) == pytest.approx(plan.streamed_bytes / 12e9 * 1e3, abs=0.05)
    assert float(bound.group(2)) == pytest.approx(12e9 / plan.streamed_bytes, abs=0.005)


def test_plan_command_with_the_gtx1060_profile_fits_a_7b(capsys):
    assert main(["plan", "--model", str(LLAMA_7B), "--profile", "gtx1060-6gb", "--pcie-gbps", "12"]) == 0
    out = capsys.readouterr().out
    assert "int8 weights, float32 compute, context 1024, batch 2" in out


def test_plan_command_needs_a_memory_limit(capsys):
    assert main(["plan", "--model", str(LLAMA_7B)]) == 2
    assert "--memory-limit" in capsys.readouterr().err


def test_readme_shows_the_real_plan_output(capsys, monkeypatch):
    readme = (LLAMA_7B.parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```console\n\$ vramlite (plan [^\n]*)\n(.*?)```", readme, re.S)
    assert block, "README lost its `vramlite plan` example"
    monkeypatch.chdir(LLAMA_7B.parents[2])
    assert main(block.group(1).split()) == 0
    assert capsys.readouterr().out == block.group(2)


def test_workspace_counts_whole_prompts_past_the_budget_and_cpmant_prompt_tokens():
    from dataclasses import replace

    from vramlite.engine.config import ModelConfig
    from vramlite.engine.loader import workspace_bytes

    base = ModelConfig("llama", vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                       head_dim=16, intermediate_size=128, max_position_embeddings=512, norm_eps=1e-6,
                       hidden_act="silu", tie_word_embeddings=False)
    per_token = (4 * 64 + 12 * 16 + 3 * 128) * 4
    logits = 4 * 4 * 3 * 100
    # Chunked prefill: at most the budget of tokens in a step.
    assert workspace_bytes(base, 3, 512, 64, torch.float32) == 64 * per_token + 4 * 4 * 64 * 512 + logits
    # A whole 512-token prompt beside two decodes, each of the three with 32 prompt tokens in front.
    cpmant = replace(base, whole_prompt=True, cache_prefix=32)
    tokens = 512 + 2 + 3 * 32
    assert workspace_bytes(cpmant, 3, 512, 64, torch.float32) == tokens * per_token + 4 * 4 * 544 * 544 + logits
    encoder = replace(base, is_encoder_decoder=True)
    assert workspace_bytes(encoder, 3, 512, 64, torch.float32) == 514 * per_token + 4 * 4 * 512 * 512 + logits
