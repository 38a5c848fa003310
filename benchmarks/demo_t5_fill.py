"""Fill-in-the-blank quality of the shipped demo-t5 on its held-out fortunes.

    python -m benchmarks.demo_t5_fill [--lines 0] [--seed 0] [--model DIR]

Each held-out line (a line of a held-out fortune, whitespace runs made one space, at least MIN_TOKENS
tokens) loses one span of 1-3 tokens inside it, not cutting an English word; the prompt is the text before
it, `<span>`, the text after it. The engine (fp32, CPU) fills it greedily through `fill_blank`, as
/fill_blank does. Reports exact match (whitespace ignored) and the mean character F1 between fill and
answer (non-space characters as multisets), and how many of six famous Tang lines the model fills back
(text it trained on: recall, not generalisation).
`--lines N` takes the first N lines (0: all). Prints the figures and some examples; writes
benchmarks/results/demo_t5_fill.json.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import torch

from benchmarks.common import write_results
from vramlite import models as demo_models
from vramlite.engine import Engine
from vramlite.engine.fill_blank import fill_blank

DEMO = demo_models.path("demo-t5")
MIN_TOKENS = 6
MAX_SPAN = 3
# Famous lines of tang300 that training saw (none is held out), with the words taken out of them.
VERSE = (("床前<span>光，疑是地上霜。", "明月"), ("春眠不觉晓，处处闻<span>。", "啼鸟"),
         ("白日依山尽，黄河入<span>流。", "海"), ("红豆生<span>，春来发几枝。", "南国"),
         ("国破山河在，城春<span>深。", "草木"), ("千山鸟飞绝，万径<span>灭。", "人踪"))


class Blank(NamedTuple):
    """One held-out line with a span taken out: the prompt, with `<span>` where it was, and the span's text."""

    prompt: str
    answer: str


def held_out_lines(model_dir: Path = DEMO) -> list[str]:
    """Every line of the held-out fortunes in `heldout.txt`, whitespace runs made one space."""
    text = (model_dir / "heldout.txt").read_text(encoding="utf-8")
    docs = re.split(r"^%$", text, flags=re.M)
    return [" ".join(line.split()) for doc in docs for line in doc.splitlines() if line.strip()]


def make_blanks(tokenizer: Any, lines: list[str], seed: int = 0) -> list[Blank]:
    """One blank of 1..MAX_SPAN tokens strictly inside each line of at least MIN_TOKENS tokens, never
    starting or ending inside an English word (where a person would not put one)."""
    rng = random.Random(seed)
    blanks = []
    for line in lines:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(line, add_special_tokens=False).input_ids)
        spans = [(start, size) for size in range(1, MAX_SPAN + 1) for start in range(1, len(pieces) - size)
                 if _word_edge(pieces, start) and _word_edge(pieces, start + size)
                 and "".join(pieces[start : start + size]).strip("▁")]
        if len(pieces) < MIN_TOKENS or not spans:
            continue
        start, size = rng.choice(spans)
        before, span, after = ("".join(part).replace("▁", " ") for part in
                               (pieces[:start], pieces[start : start + size], pieces[start + size :]))
        # The blank keeps the spaces the span had around its text.
        blank = f"{' ' * span[:1].isspace()}<span>{' ' * span[-1:].isspace()}"
        blanks.append(Blank(" ".join(f"{before}{blank}{after}".split()), span.strip()))
    return blanks


def _word_edge(pieces: list[str], i: int) -> bool:
    """Whether a blank may start or end before piece `i`: not between two letters or digits of one word."""
    return not (pieces[i][0].isascii() and pieces[i][0].isalnum() and pieces[i - 1][-1].isalnum())


def fill(engine: Engine, prompt: str, max_tokens: int = 16) -> str:
    """The engine's greedy fill of the one `<span>` in `prompt`."""
    return fill_blank(engine, prompt, max_tokens=max_tokens, temperature=0).blanks[0].text


def char_f1(prediction: str, answer: str) -> float:
    """F1 of the non-space characters of the two strings, as multisets."""
    pred, gold = Counter("".join(prediction.split())), Counter("".join(answer.split()))
    overlap = sum((pred & gold).values())
    if not pred or not gold:
        return float(pred == gold)
    return 2 * overlap / (sum(pred.values()) + sum(gold.values()))


def evaluate(engine: Engine, blanks: list[Blank]) -> tuple[float, float, list[dict[str, Any]]]:
    """(exact-match rate, mean character F1, one row per blank)."""
    rows = []
    for blank in blanks:
        prediction = fill(engine, blank.prompt)
        rows.append({"prompt": blank.prompt, "answer": blank.answer, "fill": prediction,
                     "exact": "".join(prediction.split()) == "".join(blank.answer.split()),
                     "char_f1": char_f1(prediction, blank.answer)})
    exact = sum(r["exact"] for r in rows) / len(rows)
    return exact, sum(r["char_f1"] for r in rows) / len(rows), rows


def load(model_dir: Path = DEMO) -> tuple[Engine, Any]:
    """The engine (fp32, CPU) for `model_dir`, and transformers' tokenizer, whose pieces place the blanks."""
    from transformers import AutoTokenizer

    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    return engine, AutoTokenizer.from_pretrained(model_dir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=0, help="first N held-out lines (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=DEMO, help="a demo-t5 directory (default: the shipped one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine, tokenizer = load(args.model)
    lines = held_out_lines(args.model)
    blanks = make_blanks(tokenizer, lines[: args.lines] if args.lines else lines, args.seed)
    exact, f1, rows = evaluate(engine, blanks)
    verse = {prompt: fill(engine, prompt) for prompt, _ in VERSE}
    recalled = sum(verse[prompt] == answer for prompt, answer in VERSE)
    print(f"{len(blanks)} held-out blanks: exact match {exact:.3f}, character F1 {f1:.3f}")
    print(f"famous training lines: {recalled} of {len(VERSE)} recalled")
    for prompt, answer in VERSE:
        print(f"  {prompt} -> {verse[prompt]!r} ({answer})")
    for row in rows[:15]:
        print(f"  {row['prompt']!r}: answer {row['answer']!r}, fill {row['fill']!r}")
    path = write_results("demo_t5_fill", rows, blanks=len(blanks), exact_match=exact, char_f1=f1,
                         verse_fills=verse, verse_recalled=recalled, seed=args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
