"""Helpers shared by the benchmark scripts: the hardware record and the result file, timing implementations in
turns, and the random 130M LLaMA of the CPU benchmarks."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

from vramlite.engine.bench import hardware

RESULTS = Path(__file__).parent / "results"
K = TypeVar("K", bound=Hashable)


def write_results(name: str, rows: list[dict[str, Any]], **extra: Any) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "hardware": hardware(),
               **extra, "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def gpu_slug() -> str:
    """The current CUDA GPU's name as a part of a result file's name: "NVIDIA H200" -> "nvidia-h200"."""
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def report(name: str, rows: list[dict[str, Any]], columns: list[str], **extra: Any) -> None:
    """Print the table of every row, write the result file (`write_results`) and say where."""
    print()
    print_table(rows, columns)
    print(f"\nwrote {write_results(name, rows, **extra)}")


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def call_seconds(run: Callable[[], object], calls: int = 1) -> Callable[[], float]:
    """A measurement: the mean time of `calls` calls of `run`, in seconds."""
    def measure() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            run()
        return (time.perf_counter() - start) / calls
    return measure


def best_in_turns(measures: dict[K, Callable[[], float]], repeats: int) -> dict[K, float]:
    """For each implementation (or measurement), the least of `repeats` measurements (seconds) after one warm-up.

    The implementations take turns, one measurement each per round, so a noisy spell of a shared machine falls
    on all of them alike rather than on whichever ran through it.
    """
    for measure in measures.values():
        measure()
    best = dict.fromkeys(measures, float("inf"))
    for _ in range(repeats):
        for label, measure in measures.items():
            best[label] = min(best[label], measure())
    return best


def over_cpu_models(batches: list[int], bench: Callable[[str, Path, int], list[dict[str, Any]]]
                    ) -> list[dict[str, Any]]:
    """The rows of `bench(name, model_dir, batch)` for each batch size on each of the CPU benchmarks' models:
    the shipped demo model and the random 130M LLaMA (written to a temporary directory)."""
    from vramlite import models

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model_dir in {"demo-llama": models.path(), "llama-130m-random": random_llama_130m(Path(tmp))}.items():
            for batch in batches:
                rows += bench(name, model_dir, batch)
    return rows


def random_llama_130m(out: Path) -> Path:
    """A ~130M-parameter LLaMA with random weights and a 32000-word word-level tokenizer, written to `out`."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2)
    tf.LlamaForCausalLM(cfg).save_pretrained(out)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(32000)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    return out
