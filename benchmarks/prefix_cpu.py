"""Prefix caching on the CPU: a conversation's turns with and without it, same weights, threads and run.

    python -m benchmarks.prefix_cpu [--threads 2] [--turns 5] [--turn-tokens 64] [--reply-tokens 16] [--repeats 3]

Models: the shipped demo model and the random ~130M-parameter LLaMA of `benchmarks.decode_cpu`. A chat resends
its whole history each turn: turn i's prompt is turn i-1's prompt and reply plus `--turn-tokens` new random
tokens, and the reply is `--reply-tokens` greedy tokens. Two engines in fp32, prefix caching on and off, run the
same conversation, taking turns; each conversation runs `--repeats` times (the best kept), from a cache that the
previous repeat left holding other tokens. Per turn: the prompt length, the seconds to the reply with and without
caching, and their ratio; then the whole conversation. Prints a table; writes benchmarks/results/prefix_cpu.json.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import over_cpu_models, print_table, report
from vramlite.engine import Engine, SamplingParams

CONTEXT = 512  # the demo model's positions
COLUMNS = ["model", "turn", "prompt", "cached_s", "uncached_s", "speedup"]


def conversation(engine: Engine, turns: int, turn_tokens: int, reply: SamplingParams, seed: int) -> list[float]:
    """Seconds per turn of one conversation of random user turns and greedy replies."""
    rng = random.Random(seed)
    history: list[int] = []
    seconds = []
    for _ in range(turns):
        history += rng.choices(range(3, engine.config.vocab_size), k=turn_tokens)
        start = time.perf_counter()
        history += engine.generate(history, reply).token_ids
        seconds.append(time.perf_counter() - start)
    return seconds


def bench_model(name: str, model_dir: Path, turns: int, turn_tokens: int, reply_tokens: int, repeats: int
                ) -> list[dict[str, Any]]:
    engines = {caching: Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1, context=CONTEXT,
                                        prefix_caching=caching) for caching in (True, False)}
    reply = SamplingParams(max_tokens=reply_tokens, temperature=0, ignore_eos=True)
    best = {caching: [float("inf")] * turns for caching in engines}
    for repeat in range(repeats + 1):  # the first, a warm-up, is not kept
        for caching, engine in engines.items():
            seconds = conversation(engine, turns, turn_tokens, reply, seed=repeat)
            if repeat:
                best[caching] = [min(a, b) for a, b in zip(best[caching], seconds, strict=True)]
    rows = [{"model": name, "turn": i + 1, "prompt": (i + 1) * turn_tokens + i * reply_tokens,
             "cached_s": round(best[True][i], 4), "uncached_s": round(best[False][i], 4),
             "speedup": round(best[False][i] / best[True][i], 2)} for i in range(turns)]
    on, off = sum(best[True]), sum(best[False])
    rows.append({"model": name, "turn": "all", "prompt": "", "cached_s": round(on, 4), "uncached_s": round(off, 4),
                 "speedup": round(off / on, 2)})
    print_table(rows, COLUMNS)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.turns * (args.turn_tokens + args.reply_tokens) > CONTEXT:
        ap.error(f"the conversation must fit the context of {CONTEXT} tokens")
    rows = over_cpu_models([1], lambda name, model_dir, batch: bench_model(
        name, model_dir, args.turns, args.turn_tokens, args.reply_tokens, args.repeats))
    report("prefix_cpu", rows, COLUMNS, threads=args.threads, turns=args.turns, turn_tokens=args.turn_tokens,
           reply_tokens=args.reply_tokens, repeats=args.repeats)


if __name__ == "__main__":
    main()
