"""The shipped demo model: it loads, reads its corpus well, and `vramlite generate` prints its kind of text."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

pytest.importorskip("pydantic")  # not on a GPU host with only the engine's packages: see conftest

from vramlite import models as demo_models
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.layers.cpu_layout import onednn_int8_available
from vramlite.engine.runner import Chunk, torch_compiles_decode
from vramlite.server.cli import main as cli_main

DEMO = demo_models.path()
# Measured 54.76 on the shipped weights (fp32, CPU, the first 120 held-out fortunes, 2026-11-23); the
# build script reports 62.5 over all held-out fortunes. int8 (LM head too): +0.00% perplexity, 255/256 top-1 agreement
# (251/256 through decode steps, 2026-11-24); packed for oneDNN (W8A8): +0.07%, 251/256 (252/256), 2026-12-03;
# prefill rows multiplied in bf16 (CPUs with bf16 math): -0.00%, 255/256 (252/256), 2026-12-03.
PERPLEXITY_BOUND = 60.0
HELD_OUT_DOCS = 120


@pytest.fixture(scope="module")
def engine():
    return Engine.from_dir(DEMO, device="cpu", dtype="fp32", max_batch_size=1)


@pytest.fixture(scope="module", params=["dense", pytest.param("packed", marks=[pytest.mark.slow, pytest.mark.skipif(
    not onednn_int8_available(), reason="no exact oneDNN int8 linear on this CPU")])])
def int8_engine(request):
    """int8 weights as torch's int8-weight kernel multiplies them (W8A16), or packed for oneDNN (W8A8: slow on
    the demo's small weights, which oneDNN multiplies with its reference code)."""
    return Engine.from_dir(DEMO, device="cpu", dtype="fp32", max_batch_size=1, quantize="int8",
                           cpu_layout=request.param)


def held_out_documents() -> list[str]:
    text = (DEMO / "heldout.txt").read_text(encoding="utf-8")
    return [d.strip("\n") for d in re.split(r"^%$", text, flags=re.M) if d.strip()]


def test_demo_fits_the_size_budget():
    assert sum(f.stat().st_size for f in DEMO.iterdir()) <= 25 * 2**20
    assert {"config.json", "model.safetensors", "tokenizer.model", "README.md"} <= {f.name for f in DEMO.iterdir()}


def perplexity(engine: Engine) -> float:
    nll, count = 0.0, 0
    for doc in held_out_documents()[:HELD_OUT_DOCS]:
        ids = [*engine.tokenizer.encode(doc), *engine.eos_ids[:1]][: engine.context]
        logits = engine.runner.forward_all([Chunk(0, ids, 0)])[0]
        nll += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def test_held_out_perplexity(engine):
    ppl = perplexity(engine)
    print(f"held-out perplexity {ppl:.2f}")
    assert ppl < PERPLEXITY_BOUND


def test_int8_perplexity_rises_less_than_2_percent(engine, int8_engine):
    fp32, int8 = perplexity(engine), perplexity(int8_engine)
    print(f"held-out perplexity fp32 {fp32:.3f} int8 {int8:.3f} (+{100 * (int8 / fp32 - 1):.2f}%)")
    assert int8 < 1.02 * fp32


def test_int8_agrees_with_fp32_on_greedy_tokens(engine, int8_engine):
    """Teacher-forced top-1 agreement over 64 greedy fp32 tokens from each of four prompts, the int8 logits
    computed as prefill (many rows: weights dequantized, or W8A8) and as decode steps (one row: torch's int8
    kernel with bf16 activations, or W8A8)."""
    agree, total = {"prefill": 0, "decode": 0}, 0
    for prompt in ("床前明月光，", "春眠不觉晓，", "A fortune cookie says", "The best way to"):
        out = engine.generate(prompt, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
        ids = engine.tokenizer.encode(prompt) + out.token_ids
        n, start = len(out.token_ids), len(ids) - len(out.token_ids) - 1
        expected = torch.tensor(out.token_ids)
        predicted = int8_engine.runner.forward_all([Chunk(0, ids[:-1], 0)])[0][-n:].argmax(-1)
        agree["prefill"] += (predicted == expected).sum().item()
        int8_engine.runner.forward([Chunk(0, ids[:start], 0)])
        stepped = [int8_engine.runner.forward([Chunk(0, [ids[t]], t)])[0].argmax().item()
                   for t in range(start, start + n)]
        agree["decode"] += (torch.tensor(stepped) == expected).sum().item()
        total += n
    print(f"int8 top-1 agreement of {total}: {agree}")
    assert min(agree.values()) / total >= 0.9


def test_tokenizer_round_trips_chinese_and_english(engine):
    for text in ("床前明月光，疑是地上霜。", "A fortune cookie says: you will write tests.\n  -- Anonymous"):
        assert engine.tokenizer.decode(engine.tokenizer.encode(text)) == text


def test_cli_generate_prints_poetry(capsys):
    assert cli_main(["generate", "--temperature", "0", "--max-tokens", "24", "床前明月光，"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("床前明月光，")
    continuation = out[len("床前明月光，"):]
    cjk = sum("\u4e00" <= ch <= "\u9fff" for ch in continuation)
    assert cjk >= 8, continuation
    assert re.search("[，。]", continuation), continuation


@pytest.mark.slow
@pytest.mark.skipif(not torch_compiles_decode(), reason=f"torch {torch.__version__} decodes eagerly")
def test_cli_generate_compiled_prints_the_same(capsys, caplog, monkeypatch):
    """Both loads with the layout pinned (untimed, so the same layout twice), through the flags' env variables."""
    monkeypatch.setenv("VRAMLITE_CPU_LAYOUT", "rows")
    args = ["generate", "--temperature", "0", "--max-tokens", "24", "床前明月光，"]
    with caplog.at_level(logging.INFO):
        assert cli_main(args) == 0
    eager = capsys.readouterr().out
    monkeypatch.setenv("VRAMLITE_COMPILE_DECODE", "1")
    with caplog.at_level(logging.INFO):
        assert cli_main(args) == 0
    assert capsys.readouterr().out == eager
    assert "compiled the decode steps in" in caplog.text
    assert caplog.text.count("cpu layout of the linear weights, as asked (rows): 25 rows") == 2


def test_cli_generate_held_to_a_json_schema(capsys, tmp_path):
    schema = {"type": "object", "properties": {"poet": {"type": "string", "maxLength": 4}}, "required": ["poet"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    args = ["generate", "--temperature", "0", "--max-tokens", "40", "--speculative-tokens", "4"]
    assert cli_main([*args, "--json-schema", f"@{tmp_path / 'schema.json'}", "床前明月光，"]) == 0
    doc = json.loads(capsys.readouterr().out[len("床前明月光，"):])
    assert list(doc) == ["poet"] and len(doc["poet"]) <= 4
    assert cli_main([*args, "--regex", "[0-9]{3}", "床前明月光，"]) == 0
    assert re.fullmatch("[0-9]{3}\n", capsys.readouterr().out[len("床前明月光，"):])
    assert cli_main([*args, "--regex", "(", "x"]) == 2
    assert "output pattern" in capsys.readouterr().err
    assert cli_main([*args, "--choice", "李白", "--choice", "杜甫 (712)", "床前明月光，"]) == 0
    assert capsys.readouterr().out[len("床前明月光，"):] in ("李白\n", "杜甫 (712)\n")


def test_cli_generate_takes_min_p_and_min_tokens(capsys):
    """min_p 1 makes a hot draw greedy; min_tokens holds off EOS (the greedy poem line ends before 30 tokens)."""
    args = ["generate", "--max-tokens", "30", "床前明月光，"]
    assert cli_main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert cli_main([*args, "--temperature", "5", "--seed", "2", "--min-p", "1"]) == 0
    assert capsys.readouterr().out == greedy
    assert cli_main([*args, "--temperature", "0", "--min-tokens", "30"]) == 0
    held = capsys.readouterr().out
    assert held.startswith(greedy.rstrip("\n")) and len(held) > len(greedy)


def test_cli_reports_bad_model_dir(tmp_path, capsys):
    assert cli_main(["generate", "--model", str(tmp_path / "nope"), "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err
