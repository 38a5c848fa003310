"""Peak host memory while loading: a ~1B-parameter random LLaMA, fp16 on disk, quantized to int8 at load.

    python -m benchmarks.load_memory [--layers 16] [--hidden 2048] [--device cpu] [--keep DIR]

Writes the checkpoint (one fp16 safetensors file) to a temporary directory, then loads it with
`Engine.from_dir(..., quantize="int8")` in a fresh subprocess and reads that process's peak RSS
(ru_maxrss) and the bytes the loaded model holds (parameters and buffers). Goal (the offload issue):
peak RSS ≤ 1.3 × the int8 model's bytes + 1 GiB. Also loads it once without quantizing, for scale.
Prints a table; writes benchmarks/results/load_memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from benchmarks.common import print_table, write_results
from vramlite import models as demo_models

GIB = 2**30
CHILD = """
import json, resource, sys, time
import torch
from vramlite.engine import Engine
start = time.perf_counter()
engine = Engine.from_dir(sys.argv[1], device=sys.argv[2], dtype="fp16", quantize=sys.argv[3] or None,
                         max_batch_size=1, context=64)
seconds = time.perf_counter() - start
model = engine.runner.model
held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_rss": peak, "model_bytes": held, "load_s": seconds}))
"""


def write_checkpoint(out: Path, layers: int, hidden: int, vocab: int) -> None:
    """A random fp16 LLaMA (TinyLlama-like proportions)."""
    intermediate = int(hidden * 2.6875)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
              "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 2048, "torch_dtype": "float16", "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).half()

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": torch.ones(hidden).half(),
               "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{name}.weight"] = rand(hidden, hidden)
        tensors[p + "mlp.gate_proj.weight"] = rand(intermediate, hidden)
        tensors[p + "mlp.up_proj.weight"] = rand(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden, intermediate)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden).half()
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden).half()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for name in ("tokenizer.model", "tokenizer_config.json"):  # any tokenizer will do: only loading is measured
        shutil.copy(demo_models.path() / name, out / name)


def measure(model_dir: Path, device: str, quantize: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), device, quantize], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep", type=Path, help="write the checkpoint here (and reuse it if present)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.keep or Path(tmp)
        model_dir.mkdir(parents=True, exist_ok=True)
        if not (model_dir / "tokenizer.model").exists():
            write_checkpoint(model_dir, args.layers, args.hidden, args.vocab)
        params = sum(math.prod(v["shape"]) for k, v in _header(model_dir / "model.safetensors").items()
                     if k != "__metadata__")
        file_bytes = (model_dir / "model.safetensors").stat().st_size
        rows = []
        for quantize in ("int8", ""):
            m = measure(model_dir, args.device, quantize)
            bound = 1.3 * m["model_bytes"] + GIB
            rows.append({"weights": quantize or "fp16", "params_m": round(params / 1e6), "file_gib":
                         round(file_bytes / GIB, 2), "model_gib": round(m["model_bytes"] / GIB, 2),
                         "peak_rss_gib": round(m["peak_rss"] / GIB, 2), "bound_gib": round(bound / GIB, 2),
                         "within_bound": m["peak_rss"] <= bound, "load_s": round(m["load_s"], 1)})
    print_table(rows, list(rows[0]))
    path = write_results("load_memory", rows, device=args.device,
                         goal="int8: peak RSS <= 1.3 x model bytes + 1 GiB")
    print(f"wrote {path}")


def _header(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


if __name__ == "__main__":
    main()
