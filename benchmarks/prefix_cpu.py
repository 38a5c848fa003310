"""Prefix caching on the CPU: a conversation's turns, and a second user sharing a first one's system prompt, with
and without it, same weights, threads and run.

    python -m benchmarks.prefix_cpu [--threads 2] [--turns 5] [--turn-tokens 64] [--reply-tokens 16] [--repeats 3]
                                    [--system-tokens 256]

Models: the shipped demo model and the random ~130M-parameter LLaMA of `benchmarks.decode_cpu`. A chat resends
its whole history each turn: turn i's prompt is turn i-1's prompt and reply plus `--turn-tokens` new random
tokens, and the reply is `--reply-tokens` greedy tokens. Two engines in fp32, prefix caching on and off, run the
same conversation, taking turns; each conversation runs `--repeats` times (the best kept), from a cache that the
previous repeat left holding other tokens. Per turn: the prompt length, the seconds to the reply with and without
caching, and their ratio; then the whole conversation. Last, row "shared": while a request of a `--system-tokens`
system prompt and a 16-token question decodes, a second one with the same system prompt arrives; the seconds from
its arrival to its first token (with caching, its prompt's keys and values are copied from the first one's slot).
Prints a table; writes benchmarks/results/prefix_cpu.json.
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


def second_user_wait(engine: Engine, system_tokens: int, seed: int) -> float:
    """Seconds from a second request's arrival to its first token, while a first one with the same system prompt
    (random tokens) and another question decodes."""
    rng = random.Random(seed)
    system = rng.choices(range(3, engine.config.vocab_size), k=system_tokens)
    first, second = (system + rng.choices(range(3, engine.config.vocab_size), k=16) for _ in range(2))
    running = engine.add_request(first, SamplingParams(max_tokens=CONTEXT, temperature=0, ignore_eos=True))
    while engine.sequence(running).num_output_tokens < 2:
        engine.step()
    start = time.perf_counter()
    arriving = engine.sequence(engine.add_request(second, SamplingParams(max_tokens=1, temperature=0)))
    while not arriving.finished:
        engine.step()
    seconds = time.perf_counter() - start
    engine.abort(running)
    return seconds


def bench_model(name: str, model_dir: Path, turns: int, turn_tokens: int, reply_tokens: int, repeats: int,
                system_tokens: int) -> list[dict[str, Any]]:
    engines = {caching: Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=2, context=CONTEXT,
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
    wait = {caching: min(second_user_wait(engine, system_tokens, seed) for seed in range(repeats + 1))
            for caching, engine in engines.items()}
    rows.append({"model": name, "turn": "shared", "prompt": system_tokens + 16, "cached_s": round(wait[True], 4),
                 "uncached_s": round(wait[False], 4), "speedup": round(wait[False] / wait[True], 2)})
    print_table(rows, COLUMNS)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--reply-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--system-tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.turns * (args.turn_tokens + args.reply_tokens) > CONTEXT:
        ap.error(f"the conversation must fit the context of {CONTEXT} tokens")
    if args.system_tokens + 16 + 2 > CONTEXT:
        ap.error(f"the system prompt, a question and 2 tokens must fit the context of {CONTEXT} tokens")
    rows = over_cpu_models([1], lambda name, model_dir, batch: bench_model(
        name, model_dir, args.turns, args.turn_tokens, args.reply_tokens, args.repeats, args.system_tokens))
    report("prefix_cpu", rows, COLUMNS, threads=args.threads, turns=args.turns, turn_tokens=args.turn_tokens,
           reply_tokens=args.reply_tokens, repeats=args.repeats, system_tokens=args.system_tokens)


if __name__ == "__main__":
    main()
