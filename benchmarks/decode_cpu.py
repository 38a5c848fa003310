"""Decode tokens/s on the CPU: vramlite vs transformers `generate`, same weights, threads and run.

    python -m benchmarks.decode_cpu [--threads 2] [--tokens 64] [--repeats 5]

Models: the shipped demo model, and a ~130M-parameter random LLaMA (hidden
768, 12 layers, vocab 32000) written to a temporary directory. For each,
batch 1 and batch 8, greedy, EOS ignored, 16-token prompts; ours in fp32,
bf16, and int8 weights with fp32 or bf16 activations, and fp32, bf16 and
int8 with `compile_decode` (which compiles while loading: the load_s
column). Decode time is the best time to produce N tokens minus the best
time to produce 1 (prefill + first token), each the least of `--repeats`
runs, the implementations taking turns. (The least of differences would not
do: one slow 1-token run makes a difference small, even negative.) Each
implementation runs in a process of its own, loaded one after the other and
then idle while the others run: in one process, where each model's memory
lands (which follows the order of loading) moved a step by up to 12%. Prints
a table; writes benchmarks/results/decode_cpu.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import best_in_turns, over_cpu_models, print_table, report

PROMPT_LEN = 16
COLUMNS = ["model", "batch", "impl", "tok_per_s", "ms_per_step", "vs_transformers_fp32", "load_s"]
THEIRS = "transformers fp32"
OURS = {"vramlite fp32": ("fp32", None, False), "vramlite bf16": ("bf16", None, False),
        "vramlite int8 w / fp32 act": ("fp32", "int8", False), "vramlite int8 w / bf16 act": ("bf16", "int8", False),
        "vramlite fp32 compiled": ("fp32", None, True), "vramlite bf16 compiled": ("bf16", None, True),
        "vramlite int8 w / fp32 act compiled": ("fp32", "int8", True)}
REPLY = "@decode_cpu "
"""Marks the worker's replies on its stdout, which libraries may print to as well."""


def prompts(vocab: int, batch: int) -> torch.Tensor:
    """The same `batch` random prompts [batch, PROMPT_LEN] in every worker."""
    return torch.randint(3, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


def load(impl: str, model_dir: Path, batch: int) -> Callable[[int], None]:
    """`run(n)`: generate n tokens for `batch` fixed random prompts with implementation `impl`."""
    if impl == THEIRS:
        import transformers as tf

        hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ids = prompts(hf.config.vocab_size, batch)
        params = {"pad_token_id": 0, "do_sample": False, "attention_mask": torch.ones_like(ids)}
        return torch.inference_mode()(lambda n: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **params))
    from vramlite.engine import Engine, SamplingParams

    dtype, quantize, compiled = OURS[impl]
    # compiling is part of loading; prefix caching off, as transformers computes each run's prompts again
    engine = Engine.from_dir(model_dir, device="cpu", dtype=dtype, max_batch_size=batch, context=256,
                             quantize=quantize, compile_decode=compiled, prefix_caching=False)
    rows = prompts(engine.config.vocab_size, batch).tolist()
    return lambda n: engine.generate_batch(rows, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))


def worker(impl: str, model_dir: Path, batch: int) -> None:
    """Load `impl`, say so with its load time, then answer each line of stdin, a token count n, with the
    seconds it took to generate n tokens."""
    start = time.perf_counter()
    run = load(impl, model_dir, batch)
    print(f"{REPLY}{time.perf_counter() - start}", flush=True)
    for line in sys.stdin:
        t0 = time.perf_counter()
        run(int(line))
        print(f"{REPLY}{time.perf_counter() - t0}", flush=True)


class Worker:
    """One implementation in a process of its own (`worker`)."""

    def __init__(self, impl: str, model_dir: Path, batch: int, threads: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.decode_cpu", "--worker", impl, str(model_dir), "--batches",
             str(batch), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.load_seconds = self._reply()

    def _reply(self) -> float:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return float(line.removeprefix(REPLY))
        raise RuntimeError(f"the worker exited with {self.proc.wait()}")

    def generate_seconds(self, tokens: int) -> float:
        """Seconds to generate `tokens` tokens (prefill included)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{tokens}\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


def bench_model(name: str, model_dir: Path, batch: int, tokens: int, repeats: int, threads: int
                ) -> list[dict[str, Any]]:
    workers: dict[str, Worker] = {}
    try:
        for impl in (THEIRS, *OURS):  # one after the other: compiling takes both cores
            workers[impl] = Worker(impl, model_dir, batch, threads)
        best = best_in_turns({(impl, n): partial(w.generate_seconds, n)
                              for impl, w in workers.items() for n in (1, tokens)}, repeats)
    finally:
        for w in workers.values():
            w.close()
    timings = {impl: best[impl, tokens] - best[impl, 1] for impl in workers}
    base = timings[THEIRS]
    rows = [{"model": name, "batch": batch, "impl": impl,
             "tok_per_s": round(batch * (tokens - 1) / s, 1),
             "ms_per_step": round(1000 * s / (tokens - 1), 2),
             "vs_transformers_fp32": round(base / s, 2),
             "load_s": round(workers[impl].load_seconds, 2)} for impl, s in timings.items()]
    print_table(rows, COLUMNS)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), args.batches[0])
        return
    rows = over_cpu_models(args.batches, lambda name, model_dir, batch: bench_model(
        name, model_dir, batch, args.tokens, args.repeats, args.threads))
    report("decode_cpu", rows, COLUMNS, threads=args.threads, tokens=args.tokens, prompt_len=PROMPT_LEN,
           protocol="a process per implementation")


if __name__ == "__main__":
    main()
