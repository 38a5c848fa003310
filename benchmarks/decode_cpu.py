"""Decode tokens/s on the CPU: vramlite vs transformers `generate`, same weights, threads and run.

    python -m benchmarks.decode_cpu [--threads 2] [--tokens 64] [--repeats 5]

Models: the shipped demo model, and a ~130M-parameter random LLaMA (hidden
768, 12 layers, vocab 32000) written to a temporary directory. For each,
batch 1 and batch 8, greedy, EOS ignored, 16-token prompts; ours in fp32,
bf16, and int8 weights with fp32 or bf16 activations, and fp32, bf16 and
int8 with `compile_decode` (which compiles while loading: the load_s
column). Decode time is the time to produce N tokens minus the time to
produce 1 (prefill + first token), best of `--repeats`, the implementations
taking turns. Prints a table; writes benchmarks/results/decode_cpu.json.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from benchmarks.common import best_in_turns, over_cpu_models, print_table, report
from engine import Engine, SamplingParams

PROMPT_LEN = 16
COLUMNS = ["model", "batch", "impl", "tok_per_s", "ms_per_step", "vs_transformers_fp32", "load_s"]
OURS = (("vramlite fp32", "fp32", None, False), ("vramlite bf16", "bf16", None, False),
        ("vramlite int8 w / fp32 act", "fp32", "int8", False), ("vramlite int8 w / bf16 act", "bf16", "int8", False),
        ("vramlite fp32 compiled", "fp32", None, True), ("vramlite bf16 compiled", "bf16", None, True),
        ("vramlite int8 w / fp32 act compiled", "fp32", "int8", True))


def decode_seconds(run: Callable[[int], None], tokens: int) -> Callable[[], float]:
    """A measurement of `run`'s decode time: time(N tokens) - time(1 token)."""
    def measure() -> float:
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(tokens)
        return (time.perf_counter() - t1) - (t1 - t0)
    return measure


def bench_model(name: str, model_dir: Path, batch: int, tokens: int, repeats: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_seconds = {"transformers fp32": time.perf_counter() - start}
    prompts = torch.randint(3, hf.config.vocab_size, (batch, PROMPT_LEN), generator=g)
    params = {"pad_token_id": 0, "do_sample": False, "attention_mask": torch.ones_like(prompts)}

    @torch.inference_mode()
    def run_hf(n: int) -> None:
        hf.generate(prompts, max_new_tokens=n, min_new_tokens=n, **params)

    runs: dict[str, Callable[[int], None]] = {"transformers fp32": run_hf}
    ids = prompts.tolist()
    for label, dtype, quantize, compiled in OURS:
        start = time.perf_counter()
        engine = Engine.from_dir(model_dir, device="cpu", dtype=dtype, max_batch_size=batch, context=256,
                                 quantize=quantize, compile_decode=compiled)
        load_seconds[label] = time.perf_counter() - start  # with compile_decode, compiling is part of loading

        def run_ours(n: int, engine: Engine = engine) -> None:
            engine.generate_batch(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

        runs[label] = run_ours
    timings = best_in_turns({label: decode_seconds(run, tokens) for label, run in runs.items()}, repeats)
    base = timings["transformers fp32"]
    rows = [{"model": name, "batch": batch, "impl": impl,
             "tok_per_s": round(batch * (tokens - 1) / s, 1),
             "ms_per_step": round(1000 * s / (tokens - 1), 2),
             "vs_transformers_fp32": round(base / s, 2),
             "load_s": round(load_seconds[impl], 2)} for impl, s in timings.items()]
    print_table(rows, COLUMNS)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = over_cpu_models(args.batches, lambda name, model_dir, batch: bench_model(
        name, model_dir, batch, args.tokens, args.repeats))
    report("decode_cpu", rows, COLUMNS, threads=args.threads, tokens=args.tokens, prompt_len=PROMPT_LEN)


if __name__ == "__main__":
    main()
