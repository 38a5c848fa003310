"""CPM-2-style checkpoints: a T5 v1.1 encoder-decoder with a CPM `vocab.txt` (jieba + WordPiece) whose
sentinels are `<s_i>`. They load as the `t5` family with the CPM tokenizer and fill blanks by `<s_i>`."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from transformers import CpmAntTokenizer

pytest.importorskip("rjieba")  # not on a GPU host with only the engine's packages: see conftest

from tests.conftest import save_tiny_model
from tests.test_cpm_tokenizer import write_vocab
from tests.test_t5 import TINY, randomize, untie_head
from vramlite.engine import Engine, SamplingParams
from vramlite.engine.cpm_tokenizer import CpmTokenizer
from vramlite.engine.fill_blank import SentinelFormat, fill_blank, fill_format
from vramlite.engine.runner import Chunk

PROMPT = "床前<span>光，疑是<span>霜。举头望明月，<span>。"


@pytest.fixture(scope="module")
def cpm2(tmp_path_factory):
    """(transformers T5, directory) for a tiny random T5 v1.1 over a CPM vocabulary with `<s_N>` sentinels."""
    vocab_dir = write_vocab(tmp_path_factory.mktemp("cpm2-vocab"), {"tokenizer_class": "CpmAntTokenizer"})
    vocab_size = len((vocab_dir / "vocab.txt").read_text(encoding="utf-8").splitlines())
    torch.manual_seed(0)
    # CPM's <pad> (6) starts the decoder and </s> (3) ends it, as in CpmAntTokenizer's vocabulary.
    config = tf.T5Config(**{**TINY, "vocab_size": vocab_size, "pad_token_id": 6, "eos_token_id": 3,
                                "decoder_start_token_id": 6}, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    hf = tf.T5ForConditionalGeneration(config).eval()
    randomize(hf)
    out = save_tiny_model(hf, tmp_path_factory.mktemp("cpm2"), vocab_dir)
    untie_head(hf, out)
    # A random head would end most fills at once: 188 of its 509 words end them (EOS, <s_3>...). Silence
    # those and favour <s_0..2>, so that greedy output holds sentinels and blanks of a few words.
    with torch.no_grad():
        vocab = (vocab_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
        enders = [3, *range(vocab.index("<s_3>"), vocab_size)]
        hf.lm_head.weight[enders] = 0
        hf.lm_head.weight[[vocab.index(f"<s_{i}>") for i in range(3)]] *= 3
    tensors = load_file(out / "model.safetensors")
    save_file({**tensors, "lm_head.weight": hf.lm_head.weight.clone()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return hf, out


def test_loads_as_t5_with_the_cpm_tokenizer(cpm2):
    _, model_dir = cpm2
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=2)
    assert engine.config.model_type == "t5" and engine.config.is_encoder_decoder
    assert isinstance(engine.tokenizer, CpmTokenizer)
    assert engine.eos_ids == (3,) and engine.config.decoder_start_token_id == 6
    fmt = fill_format(engine.config, engine.tokenizer, engine.eos_ids)
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert isinstance(fmt, SentinelFormat)
    assert fmt.sentinel_ids[:3] == tuple(vocab.index(f"<s_{i}>") for i in range(3))


def test_encoder_input_is_cpm_ids_with_sentinels(cpm2):
    """Each piece around the blanks tokenized as transformers' CpmAntTokenizer does, `<s_i>` in blank i."""
    _, model_dir = cpm2
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    hf_tok = CpmAntTokenizer(str(model_dir / "vocab.txt"))
    pieces = PROMPT.split("<span>")
    expected = [hf_tok.bos_token_id]
    for i, piece in enumerate(pieces):
        expected += hf_tok.encode(piece, add_special_tokens=False)
        if i < len(pieces) - 1:
            expected.append(hf_tok.convert_tokens_to_ids(f"<s_{i}>"))
    captured = []
    forward = engine.runner.forward

    def spy(chunks, **kwargs):
        captured.extend(c.encoder_ids for c in chunks if c.encoder_ids)
        return forward(chunks, **kwargs)

    engine.runner.forward = spy
    fill_blank(engine, PROMPT, max_tokens=4, temperature=0)
    assert [list(ids) for ids in captured] == [expected]


def test_logits_match_transformers(cpm2):
    hf, model_dir = cpm2
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    encoder = engine.encode("床前明月光，疑是地上霜。")
    decoder = [6, *engine.tokenizer.encode("举头望明月", add_special_tokens=False)]
    ours = engine.runner.forward_all([Chunk(0, decoder, 0, encoder_ids=encoder)])[0]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([encoder]), decoder_input_ids=torch.tensor([decoder])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_fill_blank_greedy_matches_transformers(cpm2):
    """The blanks are what transformers' greedy decoding of the same encoder input writes, cut at `<s_i>`."""
    hf, model_dir = cpm2
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    result = fill_blank(engine, PROMPT, SamplingParams(max_tokens=12, temperature=0))
    fmt = fill_format(engine.config, engine.tokenizer, engine.eos_ids)
    encoder = fmt.prompt_ids([engine.tokenizer.encode(p, add_special_tokens=False) for p in PROMPT.split("<span>")],
                             [engine.tokenizer.bos_id], [])
    generated = hf.generate(torch.tensor([encoder]), max_new_tokens=result.completion_tokens, do_sample=False,
                            min_new_tokens=result.completion_tokens)[0, 1:].tolist()
    assert len(result.blanks) == 3 and any(b.text for b in result.blanks), result
    assert result.completion_tokens == len(generated) >= 1
    # The same tokens, parsed: a blank's text is the tokens after its sentinel up to the next one.
    parser = fmt.parser(3)
    for token in generated:
        parser.feed(token)
    parser.finish()
    assert [b.text for b in result.blanks] == [engine.tokenizer.decode(ids) for ids in parser.ids]
    first, second, third, last = PROMPT.split("<span>")
    texts = [b.text for b in result.blanks]
    assert result.text == first + texts[0] + second + texts[1] + third + texts[2] + last



def test_plain_prompt_is_continued_after_the_last_sentinel(cpm2):
    """As BMInf's CPM-2 `generate`: the prompt gets `<s_189>` at its end and the decoder writes after it."""
    hf, model_dir = cpm2
    engine = Engine.from_dir(model_dir, device="cpu", dtype="fp32", max_batch_size=1)
    vocab = (model_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
    last = vocab.index("<s_189>")
    prompt = "床前明月光，"
    captured = []
    forward = engine.runner.forward

    def spy(chunks, **kwargs):
        captured.extend((list(c.token_ids), list(c.encoder_ids)) for c in chunks if c.encoder_ids)
        return forward(chunks, **kwargs)

    engine.runner.forward = spy
    ours = engine.generate(prompt, SamplingParams(max_tokens=12, temperature=0))
    encoder = [*engine.tokenizer.encode(prompt), last]
    assert captured == [([6, last], encoder)]
    stops = [3, *(vocab.index(f"<s_{i}>") for i in range(190))]
    ref = hf.generate(torch.tensor([encoder]), decoder_input_ids=torch.tensor([[6, last]]), max_new_tokens=12,
                      do_sample=False, eos_token_id=stops)[0, 2:].tolist()
    assert ours.token_ids == ref and len(ref) >= 2
