"""The `vramlite` command line: `serve`, `generate`, `fill-blank`, `bench`, `perplexity`, `quantize` and
`plan`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vramlite import __version__
from vramlite import models as demo_models
from vramlite.engine import Engine
from vramlite.engine.errors import ModelLoadError, PromptTooLongError
from vramlite.engine.layers.cpu_layout import CHOICES as CPU_LAYOUTS
from vramlite.engine.lora import parse_adapter
from vramlite.server.settings import DEFAULT_PROFILE, Settings, load_settings


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("VRAMLITE_MODEL"),
                   help="HF-format model directory (env VRAMLITE_MODEL; default: the shipped demo model)")
    p.add_argument("--device", default=os.environ.get("VRAMLITE_DEVICE"),
                   help="cpu, cuda, cuda:N (env VRAMLITE_DEVICE; default: a GPU if present)")
    p.add_argument("--dtype", default=os.environ.get("VRAMLITE_DTYPE"), choices=["auto", "fp32", "fp16", "bf16"],
                   help="compute dtype (env VRAMLITE_DTYPE; default: the best for the device)")
    p.add_argument("--quantize", default=os.environ.get("VRAMLITE_QUANTIZE"), choices=["int8"],
                   help="quantize the decoder layers at load (env VRAMLITE_QUANTIZE)")
    p.add_argument("--memory-limit", default=os.environ.get("VRAMLITE_MEMORY_LIMIT"),
                   help="device memory budget such as 5GiB; layers beyond it are streamed (env VRAMLITE_MEMORY_LIMIT)")
    p.add_argument("--compile-decode", action="store_true",
                   default=os.environ.get("VRAMLITE_COMPILE_DECODE", "").lower() in ("1", "true", "yes", "on"),
                   help="CPU: run decode steps compiled by torch.compile, compiled at load (tens of seconds; "
                   "pays most on small models) (env VRAMLITE_COMPILE_DECODE)")
    p.add_argument("--kv-cache-dtype", default=os.environ.get("VRAMLITE_KV_CACHE_DTYPE", "auto"),
                   choices=["auto", "int8"], help="keys and values cached in the compute dtype (auto) or int8, "
                   "about half the memory (env VRAMLITE_KV_CACHE_DTYPE)")
    p.add_argument("--lora", action="append", metavar="DIR[:SCALE]",
                   help="PEFT LoRA adapter merged into the weights at load, at SCALE (default 1); repeatable "
                   "(env VRAMLITE_LORA, comma-separated)")
    p.add_argument("--cpu-layout", default=os.environ.get("VRAMLITE_CPU_LAYOUT", "auto"),
                   choices=CPU_LAYOUTS,
                   help="CPU: layout of linear weights (float and int8); auto: the fastest, timed at load; "
                   "a name: that layout wherever it applies, the same on every load (env VRAMLITE_CPU_LAYOUT)")


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `Engine.from_dir` arguments of the flags `add_model_args` adds (all but --model)."""
    return {"device": args.device, "dtype": args.dtype, "quantize": args.quantize, "memory_limit": args.memory_limit,
            "compile_decode": args.compile_decode, "cpu_layout": args.cpu_layout,
            "kv_cache_dtype": args.kv_cache_dtype, "lora": lora_adapters(args.lora)}


def lora_adapters(flags: list[str] | None) -> list[tuple[str, float]]:
    """The --lora flags' adapters as (directory, scale), else those of VRAMLITE_LORA."""
    specs = flags if flags is not None else os.environ.get("VRAMLITE_LORA", "").split(",")
    return [parse_adapter(spec.strip()) for spec in specs if spec.strip()]


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; unset ones fall back to the model's generation_config.json, then our defaults."""
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", "--top-n", dest="top_k", type=int, help="0 = off")
    p.add_argument("--min-p", type=float, help="cut tokens less likely than this times the most likely (0 = off)")
    p.add_argument("--min-tokens", type=int, help="generate at least this many tokens before EOS or a stop")
    p.add_argument("--frequency-penalty", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--seed", type=int)


SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "min_tokens", "frequency_penalty",
                   "presence_penalty", "repetition_penalty", "stop", "seed")


def cmd_generate(args: argparse.Namespace) -> int:
    engine = Engine.from_dir(args.model or demo_models.path(), max_batch_size=1,
                             speculative_tokens=args.speculative_tokens, **model_kwargs(args))
    schema = args.json_schema
    if schema is not None and schema.startswith("@"):
        schema = Path(schema[1:]).read_text(encoding="utf-8")
    params = engine.sampling_params(**{f: getattr(args, f) for f in SAMPLING_FIELDS}, json_schema=schema,
                                    regex=args.regex, choice=args.choice)
    out = sys.stdout
    out.write(args.prompt)
    reason = None
    for step in engine.stream(args.prompt, params):
        out.write(step.text)
        out.flush()
        reason = step.finish_reason
    out.write("\n")
    logging.getLogger("vramlite").info("finish_reason=%s", reason.value if reason else None)
    return 0


def cmd_fill_blank(args: argparse.Namespace) -> int:
    from vramlite.engine.fill_blank import fill_blank

    engine = Engine.from_dir(args.model or demo_models.path(demo_models.FILL_BLANK), max_batch_size=1,
                             **model_kwargs(args))
    result = fill_blank(engine, args.prompt, **{f: getattr(args, f) for f in SAMPLING_FIELDS})
    if args.json:
        print(json.dumps({"blanks": [dataclasses.asdict(b) for b in result.blanks], "text": result.text},
                         ensure_ascii=False))
    else:
        print(result.text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import time

    from vramlite.engine.bench import bench, hardware

    context = args.prompt_len + args.tokens
    engine = Engine.from_dir(args.model or demo_models.path(), max_batch_size=max(args.batch), context=context,
                             **model_kwargs(args))
    results = []
    for b in args.batch:
        # warm-up in the measured shapes: first calls allocate, and on a GPU compile and tune each shape's kernels
        bench(engine, b, args.prompt_len, 3)
        results.append(bench(engine, b, args.prompt_len, args.tokens))
    weights = engine.config.quantization or str(engine.dtype).removeprefix("torch.")
    print(f"model {engine.model_dir}: {engine.config.model_type}, {engine.config.num_layers} layers, {weights} "
          f"weights, {str(engine.dtype).removeprefix('torch.')} compute on {engine.probe.name}")
    streamed = bool(engine.offload and engine.offload.plan.streamed)
    header = ["batch", "prompt", "new", "prefill tok/s", "decode tok/s", "ms/step"]
    header += ["MB streamed/step", "streamed GB/s", "stall s"] if streamed else []
    header += ["peak VRAM MiB"] if engine.device.type == "cuda" else []
    rows = []
    for r in results:
        row = [r.batch, r.prompt_tokens, r.new_tokens, f"{r.prefill_tokens_per_second:.1f}",
               f"{r.decode_tokens_per_second:.1f}", f"{r.ms_per_step:.2f}"]
        if streamed:
            copy_rate = r.h2d_bytes / r.decode_seconds / 1e9 if r.decode_seconds else 0.0
            row += [f"{r.h2d_bytes_per_step / 1e6:.1f}", f"{copy_rate:.2f}", f"{r.stall_seconds:.3f}"]
        if engine.device.type == "cuda":
            row += [f"{r.peak_device_bytes / 2**20:.0f}"]
        rows.append([str(v) for v in row])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    if args.json:
        payload = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": str(engine.model_dir),
                   "model_type": engine.config.model_type, "weights": weights,
                   "dtype": str(engine.dtype).removeprefix("torch."), "hardware": hardware(),
                   "device": engine.probe.as_dict(),
                   "plan": engine.offload.plan.as_dict() if engine.offload else None,
                   "rows": [r.as_dict() for r in results]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from vramlite.engine.perplexity import perplexity

    texts = [Path(path).read_text(encoding="utf-8") for path in args.files]
    engine = Engine.from_dir(args.model or demo_models.path(), max_batch_size=args.batch, context=args.context,
                             **model_kwargs(args))
    result = perplexity(engine, texts)
    weights = engine.config.quantization or str(engine.dtype).removeprefix("torch.")
    print(f"model {engine.model_dir}: {weights} weights on {engine.probe.name}, windows of {engine.context - 1} "
          f"tokens")
    print(f"perplexity {result.value:.4f} over {result.tokens} tokens (mean NLL {result.nll / result.tokens:.4f}), "
          f"{result.tokens_per_second:.1f} tokens/s")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from vramlite.engine.quantize import quantize_checkpoint

    out = quantize_checkpoint(args.in_dir, args.out_dir, lora=lora_adapters(args.lora or []))
    print(f"wrote the int8 checkpoint {out}")
    return 0


PLAN_SETTINGS = ("model", "dtype", "quantize", "memory_limit", "max_batch_size", "context", "max_tokens_per_step",
                 "prefetch_depth")


def cmd_plan(args: argparse.Namespace) -> int:
    import torch

    from vramlite.engine.device import pick_dtype
    from vramlite.engine.gpu_probe import probe_device
    from vramlite.engine.loader import plan_from_config
    from vramlite.engine.offload.planner import plan_table

    flags = {name: getattr(args, name, None) for name in PLAN_SETTINGS}
    s = load_settings(flags, os.environ, args.profile)
    if s.memory_limit is None:
        raise ValueError("plan needs a memory limit: --memory-limit 5GiB, or a profile that sets one")
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    default = None if gpu is not None else "fp16"  # the GPU's own choice (fp32 on Pascal), or fp16 for one elsewhere
    dtype = pick_dtype(gpu or torch.device("cpu"), s.dtype if s.dtype not in (None, "auto") else default)
    if args.pcie_gbps is not None:
        bandwidth, source = args.pcie_gbps * 1e9, "given by --pcie-gbps"
    elif gpu is not None:
        probe = probe_device(gpu)
        bandwidth, source = probe.h2d_bytes_per_second, f"measured on {probe.name}"
    else:
        bandwidth, source = 0.0, "unknown (no GPU here: give --pcie-gbps)"
    model = s.model or demo_models.path()
    plan, cfg, context = plan_from_config(model, dtype, s.memory_limit, None if s.quantize == "none" else s.quantize,
                                          s.max_batch_size, s.context, s.max_tokens_per_step, s.prefetch_depth,
                                          bandwidth, kv_int8=s.kv_cache_dtype == "int8")
    print(f"model {model}: {cfg.model_type}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{'int8' if cfg.quantization else str(dtype).removeprefix('torch.')} weights, "
          f"{str(dtype).removeprefix('torch.')} compute, context {context}, batch {s.max_batch_size}")
    print(f"host→device bandwidth: {source}")
    print("\n".join(plan_table(plan, s.max_batch_size)))
    return 0


def add_settings_args(p: argparse.ArgumentParser) -> None:
    """One flag per daemon setting (`max_queue` → `--max-queue`); unset flags leave env and profile in charge."""
    p.add_argument("--profile", default=os.environ.get("VRAMLITE_PROFILE", DEFAULT_PROFILE),
                   help="TOML profile: a name in configs/ (default, gtx1060-6gb) or a path (env VRAMLITE_PROFILE)")
    for name, field in Settings.model_fields.items():
        # SUPPRESS: an unset flag must not overwrite the top-level --log-level with None.
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                       help=f"{field.description or name} (env VRAMLITE_{name.upper()})")


def cmd_serve(args: argparse.Namespace) -> int:
    from vramlite.server.serve import serve  # FastAPI and uvicorn load only for this subcommand

    flags = {name: getattr(args, name, None) for name in Settings.model_fields}
    settings = load_settings(flags, os.environ, args.profile)
    logging.getLogger().setLevel(settings.log_level.upper())
    shown = settings.model_dump(exclude={"api_key"}) | {"api_key": "set" if settings.api_key else None}
    logging.getLogger("vramlite.server").info("event=settings profile=%s %s", args.profile,
                                              " ".join(f"{k}={v}" for k, v in shown.items()))
    return serve(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vramlite", description="Run big language models on one small GPU.")
    parser.add_argument("--version", action="version", version=f"vramlite {__version__}")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING... (env VRAMLITE_LOG_LEVEL; default: WARNING, "
                        "and for serve the profile's)")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="run the HTTP daemon")
    add_settings_args(srv)
    srv.set_defaults(func=cmd_serve)
    gen = sub.add_parser("generate", help="generate text for a prompt, streamed to stdout")
    add_model_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--json-schema", help="output JSON that this JSON Schema accepts (the schema's text, or @FILE)")
    gen.add_argument("--regex", help="output text that this regular expression matches")
    gen.add_argument("--choice", action="append", help="output exactly this string or another --choice")
    gen.add_argument("--speculative-tokens", type=int, default=0,
                     help="draft up to this many tokens a step by prompt lookup, verified in one pass (default: 0)")
    gen.add_argument("prompt")
    gen.set_defaults(func=cmd_generate)
    fill = sub.add_parser("fill-blank", help="fill each <span> of a prompt (default model: the demo T5)")
    add_model_args(fill)
    add_sampling_args(fill)
    fill.add_argument("--json", action="store_true", help="print the blanks with their positions as JSON")
    fill.add_argument("prompt", help='text with <span> blanks, e.g. "床前<span>光，疑是地上霜。"')
    fill.set_defaults(func=cmd_fill_blank)
    bch = sub.add_parser("bench", help="measure prefill and decode tokens/s of a model on this machine",
                         description="Greedy decoding of random prompts, EOS ignored, the whole batch at once; the "
                         "model loads as for generate (--quantize, --memory-limit ...).")
    add_model_args(bch)
    bch.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to run (default: 1 8)")
    bch.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default: 128)")
    bch.add_argument("--tokens", type=int, default=64, help="new tokens per sequence (default: 64)")
    bch.add_argument("--json", help="also write the results, the hardware and the memory plan to this file")
    bch.set_defaults(func=cmd_bench)
    ppl = sub.add_parser("perplexity", help="perplexity of text files under a model as loaded (dtype, int8, "
                         "memory limit): how much int8 or a setting costs in quality, on this machine",
                         description="Each file is tokenized as a prompt and cut into windows of the context less one "
                         "token; every token but a window's first is scored, the windows batched.")
    add_model_args(ppl)
    ppl.add_argument("--context", type=int, help="window size plus one (default: the model's maximum, whose KV "
                     "cache for --batch windows a long-context model may not have room for: set it lower)")
    ppl.add_argument("--batch", type=int, default=8, help="windows scored at once (default: 8)")
    ppl.add_argument("files", nargs="+", help="UTF-8 text files")
    ppl.set_defaults(func=cmd_perplexity)
    qnt = sub.add_parser("quantize", help="write an int8 copy of an HF-format checkpoint (loads without re-quantizing)")
    qnt.add_argument("in_dir", help="HF-format model directory")
    qnt.add_argument("out_dir", help="new directory for the int8 checkpoint")
    qnt.add_argument("--lora", action="append", metavar="DIR[:SCALE]",
                     help="PEFT LoRA adapter merged into the weights before quantizing; repeatable")
    qnt.set_defaults(func=cmd_quantize)
    pln = sub.add_parser("plan", help="print the VRAM plan for a model from its config.json alone (no weights)",
                         description="Resident vs streamed layers, KV cache, swap slots, workspace, host memory and "
                         "the decode speed the host-to-device copies allow. Settings as for serve: flags > env "
                         "VRAMLITE_* > --profile.")
    pln.add_argument("--profile", default=os.environ.get("VRAMLITE_PROFILE", DEFAULT_PROFILE),
                     help="TOML profile whose settings to plan with (env VRAMLITE_PROFILE)")
    for name in PLAN_SETTINGS:
        field = Settings.model_fields[name]
        pln.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                         help=f"{field.description or name} (env VRAMLITE_{name.upper()})")
    pln.add_argument("--pcie-gbps", type=float, help="host-to-device GB/s to assume (default: measured on the GPU "
                     "here, if any); PCIe 3.0 x16 gives about 12 pinned")
    pln.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or os.environ.get("VRAMLITE_LOG_LEVEL", "WARNING")
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ModelLoadError, PromptTooLongError, ValueError) as e:
        print(f"vramlite: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
