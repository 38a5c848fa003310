"""Build the embedded demo model from Debian's `fortunes` and `fortunes-zh`.

Trains a sentencepiece BPE tokenizer and a small LLaMA-style model on the
fortune cookies (English) and Tang/Song poetry (Chinese), then writes an
HF-format directory (config.json, model.safetensors, tokenizer.model,
tokenizer_config.json, generation_config.json, heldout.txt, README.md).

    apt-get install fortunes fortunes-zh
    python scripts/build_demo_model.py --out vramlite/models/demo-llama --minutes 60

Needs the `test` extras (transformers builds and trains the model).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import sentencepiece as spm
import torch
from demo_corpus import FORTUNES, is_heldout, read_corpus


def train_tokenizer(docs: list[str], out: Path, vocab_size: int) -> spm.SentencePieceProcessor:
    corpus = out / "corpus.tmp.txt"
    corpus.write_text("\n".join(d.replace("\n", " ") for d in docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        normalization_rule_name="identity",  # NFKC would rewrite "，" as ","
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=16384,
        num_threads=2,
    )
    corpus.unlink()
    (out / "tokenizer.vocab").unlink()
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=FORTUNES)
    ap.add_argument("--out", type=Path, default=Path("vramlite/models/demo-llama"))
    ap.add_argument("--minutes", type=float, default=60.0, help="training wall-clock budget")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    docs = read_corpus(args.corpus)
    train_docs = [d for d in docs if not is_heldout(d)]
    held_docs = [d for d in docs if is_heldout(d)]
    print(f"corpus: {len(docs)} documents, {len(held_docs)} held out")
    (args.out / "heldout.txt").write_text("\n%\n".join(held_docs) + "\n", encoding="utf-8")

    sp = train_tokenizer(train_docs, args.out, args.vocab_size)
    ids: list[int] = []
    for d in train_docs:
        ids += [sp.bos_id(), *sp.encode(d), sp.eos_id()]
    data = torch.tensor(ids, dtype=torch.long)
    print(f"train tokens: {len(data)}")

    config = LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=256, intermediate_size=688,
        num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(),
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    budget = args.minutes * 60
    start = time.monotonic()
    step = 0
    while (elapsed := time.monotonic() - start) < budget:
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = torch.randint(0, len(data) - args.seq_len - 1, (args.batch_size,))
        batch = torch.stack([data[s : s + args.seq_len + 1] for s in starts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0:
            print(f"step {step} {elapsed / 60:.1f} min lr {lr:.2e} loss {loss.item():.3f}", flush=True)
        step += 1

    model.eval()
    held_ppl = perplexity(model, sp, held_docs)
    print(f"trained {step} steps in {(time.monotonic() - start) / 60:.1f} min; held-out perplexity {held_ppl:.1f}")
    model.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    write_metadata(args.out, sp, step, args, n_params, held_ppl)


@torch.no_grad()
def perplexity(model: torch.nn.Module, sp: spm.SentencePieceProcessor, docs: list[str]) -> float:
    nll, count = 0.0, 0
    for d in docs:
        ids = torch.tensor([[sp.bos_id(), *sp.encode(d), sp.eos_id()]])[:, :512]
        logits = model(input_ids=ids).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def write_metadata(out: Path, sp: spm.SentencePieceProcessor, steps: int, args: argparse.Namespace,
                   n_params: int, held_ppl: float) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": 512, "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
        "do_sample": True, "temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.1,
    }, indent=2) + "\n")
    (out / "README.md").write_text(f"""# demo-llama

A {n_params / 1e6:.1f} M-parameter LLaMA-style model (hidden 256, 6 layers, 4 heads,
2 KV heads, vocabulary {sp.get_piece_size()} sentencepiece BPE) shipped so that
`vramlite generate` and `vramlite serve` work with no download. It writes
fortune-cookie English and Tang/Song-style Chinese lines; it knows nothing else.

- Corpus: Debian's `fortunes` (the fortune-mod cookie files; BSD-style and
  public-domain texts, see /usr/share/doc/fortunes/copyright) and
  `fortunes-zh` (Tang 300 poems, Song 100 ci, Chinese fortunes;
  GPL-3.0-or-later, see /usr/share/doc/fortunes-zh/copyright). The weights are
  derived from GPL-3.0+ text and are distributed under GPL-3.0-or-later.
- Held out: every fortune whose SHA-256 starts with a byte < 6 (≈2%), in
  `heldout.txt` (documents separated by `%` lines).
- Training: {steps} steps of {args.batch_size}×{args.seq_len} tokens, AdamW lr {args.lr},
  cosine over a {args.minutes:g}-minute budget on 2 CPU cores, bf16 autocast,
  seed {args.seed}. Held-out perplexity: {held_ppl:.1f}.
- Reproduce: `apt-get install fortunes fortunes-zh`, then
  `python scripts/build_demo_model.py --out vramlite/models/demo-llama --minutes {args.minutes:g}`.
""")


if __name__ == "__main__":
    main()
