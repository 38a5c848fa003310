"""Offload decode throughput on a GPU: a LLaMA-7B-shaped int8 model under a VRAM budget smaller than it.

    python -m benchmarks.offload [--limits none 4GiB 5GiB] [--batches 1 8 32] [--steps 16] [--no-accelerate] [--profile]

The model (32 layers, hidden 4096, MLP 11008, vocab 32000; int8 ≈ 6.7 GB) is
written once as a random int8 checkpoint in a temporary directory. For each
memory limit and batch size: decode tokens/s (greedy steps after a 16-token
prefill, timed with a device synchronize at both ends only), the effective
H2D bandwidth of the streamed copies (CUDA events) against the pinned peak
measured in the same run (goal ≥ 85%), the share of the step the copies took (under 1: the copy engine
waited on compute or the host), and the time per decode step against
its lower bound streamed_bytes / peak (goal ≤ 1.2x); the limit "none" keeps every layer resident, the step
without copies that the streamed ones compare with. Then Hugging Face
`accelerate` CPU offload (`device_map` with `max_memory`) on the same shapes in
fp16, batch 1 and 32 (goal: vramlite ≥ 10x / ≥ 50x faster). Prints a table;
writes benchmarks/results/offload.json with the GPU, its PCIe link and driver.
On a machine without a CUDA GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from benchmarks.common import print_table, write_results
from vramlite.engine.loader import INT8_METHOD, load_model
from vramlite.engine.models.base import SCALE_SUFFIX
from vramlite.engine.runner import Chunk, ModelRunner

SHAPE = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=2048)
PROMPT_LEN = 16


def write_int8_llama(out: Path, shape: dict[str, int]) -> Path:
    """A random LLaMA in our int8 checkpoint format, one shard per layer (peak RAM: one layer)."""
    h, inter, vocab = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    g = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, out / name)
        weight_map.update(dict.fromkeys(tensors, name))

    def int8(name: str, rows: int, cols: int) -> dict[str, torch.Tensor]:
        q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=g)
        return {name: q, name + SCALE_SUFFIX: torch.full((rows,), 0.02 / 127 * 3 / cols**0.5 * 64)}

    shard("embed.safetensors", {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g).half() * 0.02,
                                "model.norm.weight": torch.ones(h, dtype=torch.float16),
                                "lm_head.weight": torch.randn(vocab, h, generator=g).half() * 0.02})
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors: dict[str, torch.Tensor] = {}
        for name, rows, cols in (("self_attn.q_proj", h, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h),
                                 ("self_attn.o_proj", h, h), ("mlp.gate_proj", inter, h), ("mlp.up_proj", inter, h),
                                 ("mlp.down_proj", h, inter)):
            tensors.update(int8(f"{p}{name}.weight", rows, cols))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}{norm}.weight"] = torch.ones(h, dtype=torch.float16)
        shard(f"layer{i:03d}.safetensors", tensors)
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = {"model_type": "llama", **shape, "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
              "quantization_config": {"quant_method": INT8_METHOD, "bits": 8}}
    (out / "config.json").write_text(json.dumps(config))
    return out


def pinned_peak_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` pinned host-to-device copies of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return nbytes / best


def decode_seconds_per_step(runner: ModelRunner, batch: int, steps: int, vocab: int) -> float:
    """Prefill `batch` prompts, then time `steps` batched greedy decode steps."""
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(3, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(batch)]
    last = runner.forward([Chunk(s, p, 0) for s, p in enumerate(prompts)]).argmax(-1).tolist()
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for t in range(steps):
        last = runner.forward([Chunk(s, [tok], PROMPT_LEN + t) for s, tok in enumerate(last)]).argmax(-1).tolist()
    sync()
    return (time.perf_counter() - start) / steps


def print_profile(runner: ModelRunner, batch: int, vocab: int) -> None:
    """Where one decode step's time goes: torch's profiler over two steps, ops by self CPU time (the host's
    launch cost) with their GPU time beside."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        decode_seconds_per_step(runner, batch, 2, vocab)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


def bench_vramlite(model_dir: Path, device: torch.device, limit: str, batches: list[int], steps: int,
                   peak: float, profile: bool = False) -> list[dict[str, Any]]:
    context = PROMPT_LEN + steps + 1
    start = time.perf_counter()
    model, _ = load_model(model_dir, device, torch.float16, context=context,
                          memory_limit=None if limit == "none" else limit,
                          max_batch_size=max(batches), max_tokens_per_step=max(batches) * PROMPT_LEN)
    store = model.offload
    print(f"{limit}: loaded in {time.perf_counter() - start:.0f} s", flush=True)
    runner = ModelRunner(model, device, torch.float16, max(batches), context)
    rows = []
    for batch in batches:
        decode_seconds_per_step(runner, batch, 2, model.config.vocab_size)  # warm-up (kernels, slots)
        before = None if store is None else store.snapshot()
        step = decode_seconds_per_step(runner, batch, steps, model.config.vocab_size)
        row: dict[str, Any] = {"engine": "vramlite", "memory_limit": limit, "batch": batch,
                               "resident": model.config.num_layers, "streamed": 0,
                               "tokens_per_s": round(batch / step, 2), "step_ms": round(step * 1e3, 2)}
        if store is not None and before is not None:
            after = store.snapshot()  # the steps ended synchronized: every copy is done
            bandwidth = ((after.h2d_bytes - before.h2d_bytes) / (after.copy_seconds - before.copy_seconds)
                         if after.copy_seconds > before.copy_seconds else 0.0)
            bound = store.plan.streamed_bytes / peak
            copying = after.copy_seconds - before.copy_seconds
            row.update(resident=len(store.plan.resident), streamed=len(store.plan.streamed),
                       h2d_GBps=round(bandwidth / 1e9, 2), h2d_of_peak=round(bandwidth / peak, 3),
                       copy_busy=round(copying / (steps * step), 3),  # under 1: the copy engine waited
                       lower_bound_ms=round(bound * 1e3, 2), step_over_bound=round(step / bound, 3) if bound else None,
                       stall_s=round(after.stall_seconds - before.stall_seconds, 4), pinned=after.pinned_bytes > 0)
        rows.append(row)
        print(rows[-1], flush=True)
        if profile:
            print_profile(runner, batch, model.config.vocab_size)
    del runner, model, store
    torch.cuda.empty_cache()
    return rows


def fill_random(model: torch.nn.Module, pool_size: int = 1 << 26) -> None:
    """Random N(0, 0.02) weights, tiled from one pool (drawing 7B normals one by one takes minutes on a CPU),
    and zeroed buffers (`to_empty` leaves the rotary frequencies unset: zero keeps the numbers finite; the work,
    which is all that is timed, is the same)."""
    pool = torch.randn(pool_size, generator=torch.Generator().manual_seed(0)).half() * 0.02
    for p in model.parameters():
        flat = p.data.view(-1)
        for i in range(0, flat.numel(), pool_size):
            chunk = flat[i : i + pool_size]
            chunk.copy_(pool[: chunk.numel()])
    for b in model.buffers():
        b.zero_()


def bench_accelerate(limit: str, batches: list[int], steps: int) -> list[dict[str, Any]]:
    """transformers + accelerate CPU offload of the same shapes (fp16, random weights)."""
    try:
        import accelerate
        import transformers as tf
    except ImportError as e:
        return [{"engine": "accelerate", "memory_limit": limit, "note": f"not installed: {e}"}]
    start = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # built in fp16: no fp32 copy of 7B parameters on the way
    try:
        with accelerate.init_empty_weights():
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**SHAPE))
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    fill_random(model)
    print(f"accelerate: fp16 model built on the host in {time.perf_counter() - start:.0f} s", flush=True)
    device_map = accelerate.infer_auto_device_map(model, max_memory={0: limit, "cpu": "200GiB"},
                                                  no_split_module_classes=["LlamaDecoderLayer"])
    model = accelerate.dispatch_model(model, device_map=device_map).eval()
    rows = []
    for batch in batches:
        ids = torch.randint(3, SHAPE["vocab_size"], (batch, PROMPT_LEN), device="cuda")
        with torch.inference_mode():
            def run(n: int, ids: torch.Tensor = ids) -> float:
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
                torch.cuda.synchronize()
                return time.perf_counter() - start
            step = (run(steps + 1) - run(1)) / steps
        print(f"accelerate: batch {batch}, {step * 1e3:.0f} ms per step", flush=True)
        rows.append({"engine": "accelerate", "memory_limit": limit, "batch": batch,
                     "tokens_per_s": round(batch / step, 3), "step_ms": round(step * 1e3, 1)})
    return rows


def gpu_record() -> dict[str, Any]:
    info: dict[str, Any] = {"gpu": torch.cuda.get_device_name()}
    query = "pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,driver_version"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.splitlines()[0]
        gen, gen_max, width, driver = (v.strip() for v in out.split(","))
        info.update(pcie_link=f"Gen{gen} x{width} (max Gen{gen_max})", driver=driver)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limits", nargs="+", default=["none", "4GiB", "5GiB"],
                   help='VRAM budgets; "none": every layer resident, the step without copies to compare with')
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--no-accelerate", action="store_true")
    p.add_argument("--profile", action="store_true", help="after each batch, profile two steps (host vs GPU time)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/offload.py needs a CUDA GPU; none is visible here, nothing measured.")
        return 0
    device = torch.device("cuda")
    peak = pinned_peak_bandwidth(device)
    print(f"pinned H2D peak: {peak / 1e9:.1f} GB/s")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        model_dir = write_int8_llama(Path(tmp), SHAPE)
        print(f"int8 checkpoint written in {time.perf_counter() - start:.0f} s", flush=True)
        for limit in args.limits:
            rows += bench_vramlite(model_dir, device, limit, args.batches, args.steps, peak, args.profile)
    record = dict(**gpu_record(), pinned_peak_GBps=round(peak / 1e9, 2), shape=SHAPE)
    write_results("offload", rows, **record)  # kept should the comparison below not finish
    if not args.no_accelerate:
        limit = next((limit for limit in args.limits if limit != "none"), "4GiB")
        rows += bench_accelerate(limit, [1, max(args.batches)], max(2, args.steps // 4))
    print_table(rows, ["engine", "memory_limit", "batch", "resident", "streamed", "tokens_per_s", "step_ms",
                       "h2d_GBps", "h2d_of_peak", "copy_busy", "lower_bound_ms", "step_over_bound", "pinned"])
    print(f"wrote {write_results('offload', rows, **record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
