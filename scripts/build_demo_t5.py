"""Build the embedded fill-blank demo model from Debian's `fortunes` and `fortunes-zh`.

Trains a sentencepiece unigram tokenizer (T5's layout: pad 0, eos 1, unk 2, then the pieces, then the
`<extra_id_N>` sentinels at the end of the vocabulary) and a small T5 v1.1-style encoder-decoder with
T5's span corruption on the same documents and held-out split as the demo LLaMA, then writes an
HF-format directory (config.json, model.safetensors, spiece.model, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, generation_config.json, heldout.txt, README.md).

    apt-get install fortunes fortunes-zh
    python scripts/build_demo_t5.py --out vramlite/models/demo-t5 --minutes 60

`--init DIR` continues training a model this script wrote (its tokenizer kept); each run's budget, steps
and loss are appended to `training.json`, which the README lists. The best model so far (by held-out
span-corruption loss) is saved as training goes, so an interrupted run still leaves a usable directory.
Needs the `test` extras (transformers builds and trains the model).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import sentencepiece as spm
import torch
from demo_corpus import FORTUNES, is_heldout, read_sources

PAD, EOS, UNK = 0, 1, 2
EXTRA_IDS = 100  # sentinels <extra_id_0..99>, as T5 has them


def flatten(doc: str) -> str:
    """A document on one line: T5's tokenizer splits on any whitespace, so newlines cannot survive it."""
    return " ".join(doc.split())


def strip_attribution(doc: str) -> str:
    """The document without its closing attribution line ("-- Mark Twain", "--《谚语》"): over half the
    fortunes end with one, and a model trained on them fills any blank it is unsure of with the commonest."""
    lines = doc.rstrip().split("\n")
    if len(lines) > 1 and lines[-1].strip().startswith(("--", "——")):
        lines = lines[:-1]
    return "\n".join(lines)


def train_tokenizer(docs: list[str], out: Path, vocab_size: int) -> spm.SentencePieceProcessor:
    """A unigram model with T5's special ids; identity normalization keeps "，" and friends as written."""
    corpus = out / "corpus.tmp.txt"
    corpus.write_text("\n".join(docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "spiece"),
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=True,
        pad_id=PAD, eos_id=EOS, unk_id=UNK, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        max_sentence_length=16384,
        num_threads=1,
    )
    corpus.unlink()
    (out / "spiece.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(out / "spiece.model"))


def save_tokenizer(out: Path) -> None:
    """tokenizer.json and its configs as transformers' T5TokenizerFast writes them, from spiece.model."""
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(out, extra_ids=EXTRA_IDS, model_max_length=512)
    tok.save_pretrained(out)
    sentinels = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    # transformers 5 also writes its loading options and a list-valued `extra_special_tokens` that 4.x
    # cannot read; T5's own checkpoints name the sentinels `additional_special_tokens`, which both read.
    config = json.loads((out / "tokenizer_config.json").read_text())
    for key in ("is_local", "local_files_only", "extra_special_tokens"):
        config.pop(key, None)
    config["additional_special_tokens"] = sentinels
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "additional_special_tokens": sentinels}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def sentinel(i: int, vocab_size: int) -> int:
    """Id of `<extra_id_i>`: T5 puts them at the end of the vocabulary in reverse order."""
    return vocab_size - 1 - i


def random_segmentation(total: int, parts: int, rng: random.Random) -> list[int]:
    """`total` split into `parts` positive lengths, uniformly at random."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def span_corrupt(ids: list[int], sp: spm.SentencePieceProcessor, rng: random.Random, noise: float = 0.15,
                 mean_span: float = 3.0, binomial: bool = False) -> tuple[list[int], list[int]]:
    """T5's span corruption (`random_spans_noise_mask`): encoder input and decoder target, each ending in EOS.

    Each kept stretch of the input is re-encoded from its text, as a prompt with blanks is tokenized piece by
    piece (the text after a blank starts a new word: "光，" after a sentinel is "▁", "光", "，").
    T5 blanks `round(n * noise)` tokens, so a 12-token verse line always loses exactly 2 and the model never
    learns a one-token blank there ("床前<span>光" got "明月光"); `binomial` draws the count instead (same mean).
    """
    vocab_size = sp.get_piece_size() + EXTRA_IDS
    n = len(ids)
    num_noise = sum(rng.random() < noise for _ in range(n)) if binomial else round(n * noise)
    num_noise = min(max(1, num_noise), n - 1)
    num_spans = max(1, min(round(num_noise / mean_span), num_noise, n - num_noise))
    noise_lengths = random_segmentation(num_noise, num_spans, rng)
    # T5 always ends on a blank; half the time here text follows the last one, as in most fill-blank prompts.
    tail = rng.random() < 0.5 and n - num_noise > num_spans
    keep_lengths = random_segmentation(n - num_noise, num_spans + tail, rng)
    source, target, pos = [], [], 0
    for i, (keep, drop) in enumerate(zip(keep_lengths, noise_lengths, strict=False)):
        source += [*sp.encode(sp.decode(ids[pos : pos + keep])), sentinel(i, vocab_size)]
        pos += keep
        target += [sentinel(i, vocab_size), *ids[pos : pos + drop]]
        pos += drop
    return [*source, *sp.encode(sp.decode(ids[pos:])), EOS], [*target, EOS]


def make_batch(docs: list[list[int]], sp: spm.SentencePieceProcessor, rng: random.Random, size: int,
               max_len: int, binomial: bool) -> dict[str, torch.Tensor]:
    """`size` random documents (a random window of `max_len` tokens of longer ones), corrupted and padded."""
    pairs = []
    for _ in range(size):
        ids = rng.choice(docs)
        if len(ids) > max_len:
            start = rng.randrange(len(ids) - max_len + 1)
            ids = ids[start : start + max_len]
        pairs.append(span_corrupt(ids, sp, rng, binomial=binomial))
    return collate(pairs)


def collate(pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    src_len = max(len(s) for s, _ in pairs)
    tgt_len = max(len(t) for _, t in pairs)
    input_ids = torch.tensor([s + [PAD] * (src_len - len(s)) for s, _ in pairs])
    labels = torch.tensor([t + [-100] * (tgt_len - len(t)) for _, t in pairs])
    return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).long(), "labels": labels}


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    nll, count = 0.0, 0
    for batch in batches:
        n = (batch["labels"] != -100).sum().item()
        nll += model(**batch).loss.item() * n
        count += n
    model.train()
    return nll / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=FORTUNES)
    ap.add_argument("--out", type=Path, default=Path("vramlite/models/demo-t5"))
    ap.add_argument("--minutes", type=float, default=60.0, help="training wall-clock budget")
    ap.add_argument("--vocab-size", type=int, default=8000, help="sentencepiece pieces, sentinels excluded")
    ap.add_argument("--max-len", type=int, default=128, help="longest encoder input before corruption")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2, help="peak Adafactor learning rate (relative to weight RMS)")
    ap.add_argument("--eval-every", type=float, default=3.0, help="minutes between held-out checks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, help="continue from a model this script wrote, keeping its tokenizer")
    ap.add_argument("--strip-attributions", action="store_true",
                    help="train and evaluate on the fortunes without their closing attribution lines")
    ap.add_argument("--upweight", action="append", default=[], metavar="FILE=N",
                    help="sample the training documents of one cookie file N times as often (repeatable)")
    ap.add_argument("--line-docs", action="append", default=[], metavar="FILE=N",
                    help="also train on each line of one cookie file's training documents as a document of its own "
                         "(a verse line, as a blank in one is asked), sampled N times (repeatable)")
    ap.add_argument("--noise-count", choices=["round", "binomial"], default="round",
                    help="tokens blanked per training document: T5's round(15%% of them), or binomially drawn "
                         "(short documents then also get 1-token and longer blanks; held-out loss stays T5's)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--keep", choices=["best", "last"], default="best",
                    help="the checkpoint to keep: the lowest held-out loss, or the last (a run that teaches the "
                         "model some text by heart, such as famous verse, may pay for it in held-out loss)")
    ap.add_argument("--precision", choices=["bf16", "fp32"],
                    default="bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32",
                    help="bf16 autocast (the default where the CPU has bf16 instructions; elsewhere it is slower "
                         "than fp32) or plain fp32")
    args = ap.parse_args()
    upweight = parse_file_counts(args.upweight, "--upweight")
    line_docs = parse_file_counts(args.line_docs, "--line-docs")

    from transformers import Adafactor, GenerationConfig, T5Config, T5ForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = read_sources(args.corpus)
    if unknown := (set(upweight) | set(line_docs)) - set(sources):
        ap.error(f"--upweight / --line-docs name no cookie file of {args.corpus}: {', '.join(sorted(unknown))}")
    # The split is by the document as written, before any stripping, so it is the same whatever the options.
    held_docs = [d for ds in sources.values() for d in ds if is_heldout(d)]  # heldout.txt keeps them whole
    clean = strip_attribution if args.strip_attributions else str
    kept = {name: [clean(d) for d in ds if not is_heldout(d)] for name, ds in sources.items()}
    train_docs = {name: [flatten(d) for d in ds] for name, ds in kept.items()}
    print(f"corpus: {sum(map(len, sources.values()))} documents, {len(held_docs)} held out", flush=True)
    (args.out / "heldout.txt").write_text("\n%\n".join(held_docs) + "\n", encoding="utf-8")

    if args.init:
        for name in TOKENIZER_FILES:
            if args.init.resolve() != args.out.resolve():
                shutil.copy(args.init / name, args.out / name)
        sp = spm.SentencePieceProcessor(model_file=str(args.out / "spiece.model"))
        history = json.loads((args.init / "training.json").read_text())
    else:
        sp = train_tokenizer([d for ds in train_docs.values() for d in ds], args.out, args.vocab_size)
        save_tokenizer(args.out)
        history = []
    vocab_size = sp.get_piece_size() + EXTRA_IDS
    train_ids = [ids for name, ds in train_docs.items() for ids in sp.encode(ds) if len(ids) >= 2
                 for _ in range(upweight.get(name, 1))]
    train_ids += [ids for name, n in line_docs.items()
                  for ids in sp.encode([flatten(line) for d in kept[name] for line in d.splitlines() if line.strip()])
                  if len(ids) >= 2 for _ in range(n)]
    print(f"train tokens (upweighted): {sum(map(len, train_ids))}", flush=True)
    held_rng = random.Random(1)
    held_ids = [ids for ids in sp.encode([flatten(clean(d)) for d in held_docs]) if len(ids) >= 2]
    held_batches = [collate([span_corrupt(ids[: args.max_len], sp, held_rng) for ids in held_ids[i : i + 64]])
                    for i in range(0, len(held_ids), 64)]

    config = T5Config(
        vocab_size=vocab_size, d_model=256, d_kv=64, d_ff=640, num_layers=4, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, layer_norm_epsilon=1e-6,
        pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
    )
    if args.init:
        model = T5ForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
    else:
        model = T5ForConditionalGeneration(config)
        # transformers 5 builds every T5 with a tied head; v1.1 has its own, scaled for unit-variance logits.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, config.d_model) * config.d_model**-0.5)
    model.generation_config = GenerationConfig(decoder_start_token_id=PAD, eos_token_id=EOS, pad_token_id=PAD)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    # T5's optimizer: Adafactor steps scale with each weight's RMS. T5 folds attention's 1/sqrt(d) into tiny
    # query weights, which a plain AdamW step of the embeddings' size would swamp.
    opt = Adafactor(model.parameters(), lr=args.lr, scale_parameter=True, relative_step=False, warmup_init=False)

    budget = args.minutes * 60
    start = time.monotonic()
    # A continued run must beat its start, when both are measured on the same text.
    same_text = history and history[-1].get("strip_attributions", False) == args.strip_attributions
    best = history[-1]["held_out_loss"] if same_text else math.inf
    step, next_eval, losses = 0, args.eval_every * 60, []
    while (elapsed := time.monotonic() - start) < budget:
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = make_batch(train_ids, sp, rng, args.batch_size, args.max_len, args.noise_count == "binomial")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            recent = sum(losses[-50:]) / 50
            print(f"step {step} {elapsed / 60:.1f} min lr {lr:.2e} loss {recent:.3f}", flush=True)
        if elapsed >= next_eval or time.monotonic() - start >= budget:
            next_eval += args.eval_every * 60
            held = held_out_loss(model, held_batches)
            print(f"step {step} held-out loss {held:.3f} (best {best:.3f})", flush=True)
            if held < best or args.keep == "last":
                best = min(best, held)
                run = {"init": str(args.init) if args.init else None, "minutes": args.minutes, "steps": step,
                       "saved_after_minutes": round((time.monotonic() - start) / 60, 1), "lr": args.lr,
                       "batch_size": args.batch_size, "max_len": args.max_len, "seed": args.seed,
                       "strip_attributions": args.strip_attributions, "upweight": upweight, "line_docs": line_docs,
                       "threads": args.threads, "precision": args.precision, "keep": args.keep,
                       "noise_count": args.noise_count,
                       "held_out_loss": round(held, 3)}
                save(model, args, [*history, run], n_params, sp.get_piece_size())
    print(f"trained {step} steps in {(time.monotonic() - start) / 60:.1f} min; best held-out loss {best:.3f}")


def parse_file_counts(specs: list[str], flag: str) -> dict[str, int]:
    """`["tang300=8"]` -> `{"tang300": 8}`."""
    weights = {}
    for spec in specs:
        name, _, n = spec.partition("=")
        if not n.isdigit() or int(n) < 1:
            raise SystemExit(f"{flag} {spec!r}: expected FILE=N with N a positive whole number")
        weights[name] = int(n)
    return weights


TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def describe(runs: list[dict]) -> str:
    """The README's account of the training runs, each continuing the one before."""
    lines = []
    for i, run in enumerate(runs):
        start = "from scratch" if i == 0 else "continued from the previous run's checkpoint"
        text = ", attribution lines stripped" if run.get("strip_attributions") else ""
        text += f", {run.get('threads', 1)} CPU thread{'s' if run.get('threads', 1) > 1 else ''}"
        text += f", {run.get('precision', 'bf16')}"
        if run.get("upweight"):
            text += ", " + ", ".join(f"{name} sampled {n}x as often" for name, n in run["upweight"].items())
        if run.get("line_docs"):
            text += ", " + ", ".join(f"each line of {name} also a document, sampled {n}x"
                                     for name, n in run["line_docs"].items())
        if run.get("noise_count") == "binomial":
            text += ", blanked-token count drawn binomially"
        if run.get("keep") == "last":
            text += ", last checkpoint kept"
        if "interrupted_after_minutes" in run:
            text += f", stopped by hand after {run['interrupted_after_minutes']:g} minutes"
        lines.append(f"  {i + 1}. {start}{text}: {run['minutes']:g}-minute budget, kept after {run['steps']} steps "
                     f"({run['saved_after_minutes']:g} min) of {run['batch_size']} documents (≤{run['max_len']} "
                     f"tokens), peak lr {run['lr']}, seed {run['seed']}; held-out span-corruption loss "
                     f"{run['held_out_loss']:.3f}")
    return "\n".join(lines)


def reproduce(runs: list[dict]) -> str:
    """The commands that rebuild the shipped model: one per run, each continuing the one before."""
    commands = []
    for i, run in enumerate(runs):
        args = ["--out vramlite/models/demo-t5", *(["--init vramlite/models/demo-t5"] if i else []),
                f"--minutes {run['minutes']:g}"]
        if run["seed"]:
            args.append(f"--seed {run['seed']}")
        if run.get("strip_attributions"):
            args.append("--strip-attributions")
        if run.get("threads", 1) > 1:
            args.append(f"--threads {run['threads']}")
        args += [f"--upweight {name}={n}" for name, n in run.get("upweight", {}).items()]
        args += [f"--line-docs {name}={n}" for name, n in run.get("line_docs", {}).items()]
        if run["lr"] != 1e-2:
            args.append(f"--lr {run['lr']:g}")
        if run.get("keep") == "last":
            args.append("--keep last")
        if run.get("noise_count") == "binomial":
            args.append("--noise-count binomial")
        commands.append(f"`python scripts/build_demo_t5.py {' '.join(args)}`")
    return ", then ".join(commands)


def save(model: torch.nn.Module, args: argparse.Namespace, runs: list[dict], n_params: int, pieces: int) -> None:
    """Write the weights (fp16), configs, training history and README; a copy of the model is halved."""
    import copy

    copy.deepcopy(model).to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    (args.out / "model.safetensors").chmod(0o644)
    # T5 v1.1's own spelling (transformers 5 writes `true` plus its own `scale_decoder_outputs: false`).
    config = json.loads((args.out / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (args.out / "training.json").write_text(json.dumps(runs, indent=2) + "\n")
    # Greedy by default: a blank wants the model's best guess (a request may still ask for sampling).
    generation = json.loads((args.out / "generation_config.json").read_text())
    (args.out / "generation_config.json").write_text(json.dumps({**generation, "do_sample": False}, indent=2) + "\n")
    (args.out / "README.md").write_text(f"""# demo-t5

A {n_params / 1e6:.1f} M-parameter T5 v1.1-style encoder-decoder (gated-GELU feed-forward, untied
output head; d_model 256, 4 encoder and 3 decoder layers, 4 heads; vocabulary {pieces} sentencepiece
unigram pieces + {EXTRA_IDS} `<extra_id_N>` sentinels) shipped so that `vramlite fill-blank` and
`POST /fill_blank` work with no download. It fills blanks in fortune-cookie English and Tang/Song
Chinese verse; it knows nothing else.

- Corpus: the same documents and held-out split as demo-llama: Debian's `fortunes` (the fortune-mod
  cookie files; BSD-licensed and public-domain texts, see /usr/share/doc/fortunes/copyright) and
  `fortunes-zh` (Tang 300 poems, Song 100 ci, Chinese fortunes; GPL-3.0-or-later, see
  /usr/share/doc/fortunes-zh/copyright). The weights are derived from GPL-3.0+ text and are
  distributed under GPL-3.0-or-later.
- Text: each document on one line (whitespace runs become one space, as T5's tokenizer sees them);
  identity normalization, so "，" and "。" stay as written.
- Held out: every fortune whose SHA-256 starts with a byte < 6 (≈2%), in `heldout.txt` (documents
  separated by `%` lines).
- Training: T5 span corruption (15% noise, mean span 3), Adafactor scaled by each weight's RMS, warm-up
  then cosine over each run's budget; the checkpoint kept is the one with the lowest held-out loss,
  unless the run kept its last (`training.json` has the numbers):
{describe(runs)}
- Reproduce: `apt-get install fortunes fortunes-zh`, then
  {reproduce(runs)}.
""")


if __name__ == "__main__":
    main()
