"""Sampling cost per decode step on the CPU: vramlite's sampler vs transformers' (its logits warpers, softmax and
`torch.multinomial`, as `generate` samples), on the same logits, threads and run.

    python -m benchmarks.sampler_cpu [--threads 2] [--repeats 20]

Logits: the shipped demo model's own, over held-out text (8192 words; how peaked a trained model's next-word
distribution is decides how often top-p must sort whole rows), and random normal ones over 32000 words (flat:
top-p's worst case). Batches of 1, 8 and 32 rows; temperature alone, top-k 50, top-p 0.9, both, and a
repetition penalty over 300 tokens seen. Each
implementation's mean over `--repeats` calls, best of 3 rounds taken in turns. Prints a table; writes
benchmarks/results/sampler_cpu.json.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from benchmarks.common import best_in_turns, call_seconds, print_table, report
from vramlite import models as demo_models
from vramlite.engine import Engine
from vramlite.engine.runner import Chunk
from vramlite.engine.sampler import Sampler, SamplerState, SamplingParams

COLUMNS = ["logits", "vocab", "batch", "sampling", "transformers_ms", "vramlite_ms", "vs_transformers"]
CASES = {
    "temperature 0.7": {"temperature": 0.7},
    "top-k 50": {"temperature": 0.7, "top_k": 50},
    "top-p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "top-k 50, top-p 0.9": {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
    "repetition penalty 1.2": {"temperature": 0.7, "repetition_penalty": 1.2},
}
HISTORY = 300
"""Tokens each sequence has seen (prompt and output), for the repetition penalty."""


def demo_logits(rows: int) -> torch.Tensor:
    """The demo model's logits at `rows` positions of its held-out text (fp32 [rows, 8192])."""
    engine = Engine.from_dir(demo_models.path(), device="cpu", dtype="fp32", max_batch_size=1)
    ids = engine.tokenizer.encode((demo_models.path() / "heldout.txt").read_text(encoding="utf-8"))
    return engine.runner.forward_all([Chunk(0, ids[: min(rows + 1, engine.context)], 0)])[0][1:rows + 1]


def bench_case(logits: torch.Tensor, params: dict[str, Any], repeats: int) -> dict[str, float]:
    rows, vocab = logits.shape
    history = torch.randint(0, vocab, (rows, HISTORY), generator=torch.Generator().manual_seed(1))
    warpers = LogitsProcessorList()
    if "repetition_penalty" in params:
        warpers.append(RepetitionPenaltyLogitsProcessor(params["repetition_penalty"]))
    warpers.append(TemperatureLogitsWarper(params["temperature"]))
    if params.get("top_k"):
        warpers.append(TopKLogitsWarper(params["top_k"]))
    if params.get("top_p"):
        warpers.append(TopPLogitsWarper(params["top_p"]))
    generator = torch.Generator().manual_seed(0)

    def theirs() -> torch.Tensor:
        return torch.multinomial(warpers(history, logits).softmax(dim=-1), 1, generator=generator)

    states = []
    for i, seen in enumerate(history.tolist()):  # the first half as the prompt, the rest as generated
        states.append(SamplerState(SamplingParams(seed=i, **params), seen[: HISTORY // 2]))
        for token in seen[HISTORY // 2 :]:
            states[-1].append(token)
    sampler = Sampler()
    return best_in_turns({"transformers": call_seconds(theirs, repeats),
                          "vramlite": call_seconds(lambda: sampler(logits, states), repeats)}, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    batches = (1, 8, 32)
    demo = demo_logits(400)
    sources = {"demo model": lambda b: demo[torch.arange(b) * (len(demo) // b)],
               "random normal": lambda b: torch.randn(b, 32000, generator=torch.Generator().manual_seed(b))}
    rows: list[dict[str, Any]] = []
    for name, make in sources.items():
        for batch in batches:
            logits = make(batch)
            for case, params in CASES.items():
                t = bench_case(logits, params, args.repeats)
                rows.append({"logits": name, "vocab": logits.size(-1), "batch": batch, "sampling": case,
                             "transformers_ms": round(1000 * t["transformers"], 3),
                             "vramlite_ms": round(1000 * t["vramlite"], 3),
                             "vs_transformers": round(t["transformers"] / t["vramlite"], 2)})
                print_table(rows[-1:], COLUMNS)
    report("sampler_cpu", rows, COLUMNS, threads=args.threads, repeats=args.repeats)


if __name__ == "__main__":
    main()
