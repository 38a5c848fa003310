"""The demo T5's training examples: span corruption as scripts/build_demo_t5.py makes it."""

import importlib
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm

from vramlite import models as demo_models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
build = importlib.import_module("build_demo_t5")

LINE = "床前明月光，疑是地上霜。"  # 12 pieces: ▁ 床 前 明月 光 ， 疑 是 地 上 霜 。


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(demo_models.path("demo-t5") / "spiece.model"))


def blanked(sp: spm.SentencePieceProcessor, binomial: bool, seed: int) -> tuple[list[int], list[int], int]:
    ids = sp.encode(LINE)
    source, target = build.span_corrupt(ids, sp, random.Random(seed), binomial=binomial)
    sentinels = sum(t >= sp.get_piece_size() for t in target)  # the sentinels are the ids past the pieces
    return source, target, len(target) - 1 - sentinels  # tokens blanked: the target less its sentinels and EOS


@pytest.mark.parametrize("binomial", [False, True])
def test_blanks_put_back_give_the_line(sp: spm.SentencePieceProcessor, binomial: bool) -> None:
    vocab = sp.get_piece_size() + build.EXTRA_IDS
    for seed in range(50):
        source, target, _ = blanked(sp, binomial, seed)
        assert source[-1] == target[-1] == build.EOS
        spans: dict[int, list[int]] = {}
        for token in target[:-1]:
            if token >= sp.get_piece_size():
                current = spans.setdefault(vocab - 1 - token, [])
            else:
                current.append(token)
        text = "".join(sp.decode(spans[vocab - 1 - t]) if t >= sp.get_piece_size() else sp.id_to_piece(t)
                       for t in source[:-1]).replace("▁", "")
        assert text == LINE


def test_t5_counts_always_blank_two_of_twelve_tokens_binomial_counts_vary(sp: spm.SentencePieceProcessor) -> None:
    assert {blanked(sp, False, seed)[2] for seed in range(200)} == {2}
    counts = Counter(blanked(sp, True, seed)[2] for seed in range(200))
    assert {1, 2, 3} <= set(counts)  # a one-token blank ("明月" alone) now occurs
    assert 1.4 < sum(n * c for n, c in counts.items()) / 200 < 2.4  # mean near 12 * 15%, 1 at least
