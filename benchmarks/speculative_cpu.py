"""Speculative decoding by prompt lookup on the CPU: greedy generation with and without drafts, same weights,
threads and run.

    python -m benchmarks.speculative_cpu [--threads 2] [--tokens 128] [--drafts 4 8] [--batches 1 4] [--repeats 3]

Models: the shipped demo model and the random ~130M-parameter LLaMA of `benchmarks.decode_cpu`. Each batch
sequence continues a prompt of 64 tokens of the demo model's held-out verse (the random model: 64 random
tokens) for `--tokens` greedy tokens. Engines with 0 (off) and each `--drafts` count take turns
(`best_in_turns`). Per row: tokens/s over the batch, the speed-up over no drafts, the drafted tokens the model
kept (acceptance), and whether the output was the same as without drafts. Greedy text of a small model repeats
itself, and a random model's loops at once, so acceptance here is higher than on fresh prose and lower than on
code edits or quoting; the rows are what this machine measured, not a promise. Prints a table; writes
benchmarks/results/speculative_cpu.json.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import best_in_turns, call_seconds, over_cpu_models, report
from vramlite import models
from vramlite.engine import Engine, SamplingParams

COLUMNS = ["model", "batch", "drafts", "tok_s", "speedup", "accepted", "same_output"]
PROMPT_TOKENS = 64


def prompts(engine: Engine, batch: int) -> list[list[int]]:
    """`batch` prompts of PROMPT_TOKENS tokens: held-out verse for the demo model, random ids otherwise."""
    heldout = Path(models.path()) / "heldout.txt"
    if engine.model_dir.resolve() == Path(models.path()).resolve():
        ids = engine.encode(heldout.read_text(encoding="utf-8")[:20000])
        return [ids[i * 500 : i * 500 + PROMPT_TOKENS] for i in range(batch)]
    rng = random.Random(0)
    return [rng.choices(range(3, engine.config.vocab_size), k=PROMPT_TOKENS) for _ in range(batch)]


def bench_model(name: str, model_dir: Path, batch: int, drafts: list[int], tokens: int, repeats: int
                ) -> list[dict[str, Any]]:
    engines = {k: Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=batch,
                                  prefix_caching=False, speculative_tokens=k, speculative_max_batch=batch)
               for k in (0, *drafts)}
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    batch_prompts = prompts(engines[0], batch)
    outputs = {k: [c.token_ids for c in e.generate_batch(batch_prompts, params)] for k, e in engines.items()}
    counts = {k: (e.drafted_tokens, e.accepted_tokens) for k, e in engines.items()}  # of one batch
    seconds = best_in_turns({k: call_seconds(lambda e=e: e.generate_batch(batch_prompts, params))
                             for k, e in engines.items()}, repeats)
    rows = []
    for k in engines:
        drafted, kept = counts[k]
        rows.append({"model": name, "batch": batch, "drafts": k, "tok_s": round(batch * tokens / seconds[k], 1),
                     "speedup": round(seconds[0] / seconds[k], 2),
                     "accepted": f"{kept}/{drafted}" if drafted else "", "same_output": outputs[k] == outputs[0]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--drafts", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = over_cpu_models(args.batches, lambda name, model_dir, batch: bench_model(
        name, model_dir, batch, args.drafts, args.tokens, args.repeats))
    report("speculative_cpu", rows, COLUMNS, threads=args.threads, tokens=args.tokens, drafts=args.drafts,
           repeats=args.repeats)


if __name__ == "__main__":
    main()
