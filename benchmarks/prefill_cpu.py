"""Prefill on the CPU: time to first token, vramlite vs transformers `generate`, same weights, threads and run.

    python -m benchmarks.prefill_cpu [--threads 2] [--prompts 128 500] [--batches 1 4] [--repeats 5]

Models: the shipped demo model and the random ~130M-parameter LLaMA of `benchmarks.decode_cpu`. For each batch
size and prompt length (random token ids), the time from the prompts to every sequence's first token (greedy),
best of `--repeats`, the implementations taking turns: transformers in fp32 and bf16; ours in fp32, bf16, and
int8 weights with fp32 or bf16 activations, the engine's default scheduling (at most 512 tokens a step, so
longer batches prefill in several steps). Prefill runs eagerly whether or not decode steps are compiled, so
there are no compiled rows. Prints a table; writes benchmarks/results/prefill_cpu.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from benchmarks.common import best_in_turns, call_seconds, over_cpu_models, print_table, report
from vramlite.engine import Engine, SamplingParams

CONTEXT = 512
COLUMNS = ["model", "batch", "prompt", "impl", "ms", "tok_per_s", "vs_transformers_fp32"]
THEIRS = (("transformers fp32", torch.float32), ("transformers bf16", torch.bfloat16))
OURS = (("vramlite fp32", "fp32", None), ("vramlite bf16", "bf16", None),
        ("vramlite int8 w / fp32 act", "fp32", "int8"), ("vramlite int8 w / bf16 act", "bf16", "int8"))


def first_token_seconds(hfs: dict[str, Any], engines: dict[str, Engine], prompts: torch.Tensor, repeats: int
                        ) -> dict[str, float]:
    """Each implementation's best time from `prompts` [batch, len] to every sequence's first token."""
    params = {"pad_token_id": 0, "do_sample": False, "attention_mask": torch.ones_like(prompts), "max_new_tokens": 1}
    measures = {label: call_seconds(torch.inference_mode()(lambda hf=hf: hf.generate(prompts, **params)))
                for label, hf in hfs.items()}
    ids, first = prompts.tolist(), SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    measures |= {label: call_seconds(lambda engine=engine: engine.generate_batch(ids, first))
                 for label, engine in engines.items()}
    return best_in_turns(measures, repeats)


def bench_model(name: str, model_dir: Path, batch: int, prompt_lens: list[int], repeats: int
                ) -> list[dict[str, Any]]:
    hfs = {label: tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval() for label, dtype in THEIRS}
    # prefix caching off: the same prompts run again and again, and every run must compute them
    engines = {label: Engine.from_dir(model_dir, device="cpu", dtype=dtype, max_batch_size=batch, context=CONTEXT,
                                      quantize=quantize, prefix_caching=False) for label, dtype, quantize in OURS}
    vocab = next(iter(hfs.values())).config.vocab_size
    rows = []
    for prompt_len in prompt_lens:
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        timings = first_token_seconds(hfs, engines, prompts, repeats)
        base = timings["transformers fp32"]
        rows += [{"model": name, "batch": batch, "prompt": prompt_len, "impl": impl, "ms": round(1000 * s, 1),
                  "tok_per_s": round(batch * prompt_len / s), "vs_transformers_fp32": round(base / s, 2)}
                 for impl, s in timings.items()]
        print_table(rows[-len(timings):], COLUMNS)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompts", type=int, nargs="+", default=[128, 500])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if max(args.prompts) >= CONTEXT:
        ap.error(f"prompts must be shorter than the context, {CONTEXT}")
    torch.set_num_threads(args.threads)
    rows = over_cpu_models(args.batches, lambda name, model_dir, batch: bench_model(
        name, model_dir, batch, args.prompts, args.repeats))
    report("prefill_cpu", rows, COLUMNS, threads=args.threads, repeats=args.repeats, context=CONTEXT)


if __name__ == "__main__":
    main()
