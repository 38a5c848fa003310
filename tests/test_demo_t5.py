"""The shipped fill-blank demo model: its files are what the engine reads, and it fills held-out blanks."""

from __future__ import annotations

import json
import re

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open

from benchmarks.demo_t5_fill import DEMO, VERSE, evaluate, fill, held_out_lines, load, make_blanks
from vramlite.engine.tokenizer import Tokenizer

EXTRA_IDS = 100
# Measured through the engine (fp32, CPU) over SAMPLE on the shipped weights; see the model's README.
EXACT_MATCH_BOUND = 0.02  # measured 0.039 (all 2039 blanks: 0.033)
CHAR_F1_BOUND = 0.18  # measured 0.193 (all 2039 blanks: 0.174)
SAMPLE = slice(None, None, 16)  # every 16th held-out blank: English fortunes, Chinese fortunes and verse


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    return load(DEMO)


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(DEMO / "spiece.model"))


def test_directory_fits_the_size_budget():
    names = {f.name for f in DEMO.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "spiece.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "README.md", "heldout.txt"} <= names
    assert sum(f.stat().st_size for f in DEMO.iterdir()) <= 25 * 2**20


def test_config_is_t5_v1_1(sp):
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "t5" and config["is_encoder_decoder"]
    assert config["feed_forward_proj"] == "gated-gelu"
    assert config["tie_word_embeddings"] is False
    assert (config["pad_token_id"], config["eos_token_id"], config["decoder_start_token_id"]) == (0, 1, 0)
    assert config["vocab_size"] == sp.get_piece_size() + EXTRA_IDS
    generation = json.loads((DEMO / "generation_config.json").read_text())
    assert (generation["decoder_start_token_id"], generation["eos_token_id"]) == (0, 1)
    with safe_open(DEMO / "model.safetensors", "pt") as f:
        shared, head = f.get_tensor("shared.weight"), f.get_tensor("lm_head.weight")
    assert shared.dtype == head.dtype == torch.float16
    assert shared.shape == head.shape == (config["vocab_size"], config["d_model"])
    assert not torch.equal(shared, head)  # an untied head


def test_special_ids_and_sentinels(sp):
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer.from_dir(DEMO)
    vocab = sp.get_piece_size() + EXTRA_IDS
    assert tok.vocab_size == vocab
    assert tok.eos_ids == (1,)
    sentinels = [tok.sentinel_id(i) for i in range(EXTRA_IDS)]
    assert sentinels == list(range(vocab - 1, vocab - 1 - EXTRA_IDS, -1))  # T5's order: <extra_id_0> last
    assert set(sentinels) <= tok.special_ids
    assert tok.sentinel_id(EXTRA_IDS) is None
    assert tok.encode("<extra_id_0>", add_special_tokens=False, parse_special=True) == [vocab - 1]


def test_tokenizer_json_ids_equal_spiece_ids(sp):
    tok = Tokenizer.from_dir(DEMO)
    # Lines of box-drawing or other symbols alone are left out: there pieces of equal score (─ and ──)
    # tie, and the two Viterbi implementations break ties differently.
    lines = [t for t in held_out_lines() if re.search(r"[A-Za-z\u4e00-\u9fff]", t)]
    assert sum(bool(re.search(r"[\u4e00-\u9fff]", t)) for t in lines) > 500
    for text in ["床前明月光，疑是地上霜。", "A fortune cookie says: you will write tests. -- Anonymous", *lines]:
        ids = tok.encode(text)
        assert ids == [*sp.encode(text), 1], text
        if sp.unk_id() not in ids:  # rare characters outside the vocabulary come back as nothing
            assert tok.decode(ids) == text, text


def test_fills_held_out_blanks(reference):
    engine, tokenizer = reference
    blanks = make_blanks(tokenizer, held_out_lines())[SAMPLE]
    exact, f1, rows = evaluate(engine, blanks)
    print(f"{len(rows)} held-out blanks: exact match {exact:.3f}, character F1 {f1:.3f}")
    assert len(rows) > 100
    assert exact >= EXACT_MATCH_BOUND
    assert f1 >= CHAR_F1_BOUND


def test_readme_example_and_famous_lines(reference):
    """The README's `curl .../fill_blank` example gets the verse's own words; 4 of the 6 famous lines (training
    text) come back exactly (measured; 1 before blanked-token counts were drawn)."""
    engine, _ = reference
    fills = {prompt: fill(engine, prompt) for prompt, _ in VERSE}
    assert fills["床前<span>光，疑是地上霜。"] == "明月"
    assert sum(fills[prompt] == answer for prompt, answer in VERSE) >= 4
