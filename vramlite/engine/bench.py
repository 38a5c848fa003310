"""How fast a loaded engine runs on this machine: prefill and decode tokens/s for a batch of prompts, with the
offload traffic and peak device memory of the run (`vramlite bench`, and the benchmark scripts' hardware record).
"""

from __future__ import annotations

import os
import platform
import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from vramlite.engine.engine import Engine
from vramlite.engine.sampler import SamplingParams


@dataclass(frozen=True)
class BenchResult:
    """One run: `batch` prompts of `prompt_tokens` random tokens, each decoding `new_tokens` (EOS ignored).

    Prefill is the time until every sequence has its first token (so it includes one sampling step);
    decode is the rest: `decode_steps` steps that gave `decoded_tokens` tokens (`batch * (new_tokens - 1)`
    unless a stop token ended some sequences early). Offload figures are for the decode steps.
    """

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    decoded_tokens: int
    h2d_bytes: int = 0
    stall_seconds: float = 0.0
    peak_device_bytes: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.batch * self.prompt_tokens / self.prefill_seconds

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0

    @property
    def h2d_bytes_per_step(self) -> float:
        return self.h2d_bytes / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 1),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 1),
                "ms_per_step": round(self.ms_per_step, 3), "h2d_bytes_per_step": round(self.h2d_bytes_per_step)}


def bench(engine: Engine, batch: int, prompt_tokens: int, new_tokens: int, seed: int = 0) -> BenchResult:
    """Run `batch` random prompts through `engine` together (greedy, EOS ignored) and time both phases, prefix
    caching off while it runs (every call computes its prompts, whatever an earlier call left in the cache).

    The engine must be idle and hold `batch` sequences of `prompt_tokens + new_tokens` positions.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2 (one to end the prefill, one to decode); got {new_tokens}")
    if batch > engine.scheduler.config.max_batch_size:
        raise ValueError(f"batch {batch} is more than the engine's max_batch_size "
                         f"{engine.scheduler.config.max_batch_size}")
    rng = random.Random(seed)
    special = engine.tokenizer.special_ids
    ordinary = [i for i in range(engine.config.vocab_size) if i not in special]
    prompts = [rng.choices(ordinary, k=prompt_tokens) for _ in range(batch)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    config = engine.scheduler.config
    engine.scheduler.config = replace(config, prefix_caching=False)
    try:
        return _timed(engine, batch, prompt_tokens, new_tokens, prompts, params)
    finally:
        engine.scheduler.config = config


def _timed(engine: Engine, batch: int, prompt_tokens: int, new_tokens: int, prompts: list[list[int]],
           params: SamplingParams) -> BenchResult:
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(engine.device)
        torch.cuda.reset_peak_memory_stats(engine.device)
    ids = [engine.add_request(p, params) for p in prompts]
    start = time.perf_counter()
    while any(not engine.sequence(i).output_ids for i in ids):
        engine.step()
    prefilled = time.perf_counter()
    before = engine.offload.snapshot() if engine.offload else None
    steps = decoded = 0
    while engine.has_unfinished():
        decoded += sum(out.token_id is not None for out in engine.step())
        steps += 1
    if cuda:
        torch.cuda.synchronize(engine.device)
    end = time.perf_counter()
    after = engine.offload.snapshot() if engine.offload else None
    return BenchResult(
        batch, prompt_tokens, new_tokens, prefilled - start, end - prefilled, steps, decoded,
        h2d_bytes=after.h2d_bytes - before.h2d_bytes if after and before else 0,
        stall_seconds=after.stall_seconds - before.stall_seconds if after and before else 0.0,
        peak_device_bytes=torch.cuda.max_memory_allocated(engine.device) if cuda else 0,
    )


def hardware() -> dict[str, Any]:
    """What numbers are measured on: CPU, threads, torch and Python versions, the GPU if there is one."""
    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return info
