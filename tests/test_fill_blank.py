"""fill_blank: splitting prompts at `<span>`, the model input per format, and parsing any output into blanks.

The sentinel (T5 / CPM-2) path runs here on a small word-level tokenizer with sentinel tokens and
hand-written decoder outputs, well-formed and malformed; the fill-in-the-middle path runs end to end on a
tiny random LLaMA whose tokenizer has StarCoder's FIM tokens.
"""

from __future__ import annotations

import json

import pytest
import tokenizers
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, models, pre_tokenizers, processors

from tests.conftest import TINY_LLAMA, save_tiny_model
from vramlite import models as demo_models
from vramlite.engine import Engine, FinishReason
from vramlite.engine.config import ModelConfig
from vramlite.engine.errors import UnsupportedTaskError
from vramlite.engine.fill_blank import (
    MAX_BLANKS,
    SPAN,
    BlankCountError,
    FillRequest,
    FimFormat,
    SentinelFormat,
    fill_blank,
    fill_format,
    split_blanks,
)
from vramlite.engine.tokenizer import Tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "walks", "in", "park", "今天", "我们"]
NUM_SENTINELS = 20


def word_tokenizer(sentinel: str, eos: str | None) -> Tokenizer:
    """A word-level tokenizer: <unk>, `eos`, WORDS, then `sentinel` 0..19 as special tokens; T5-style it
    appends `eos` to every text."""
    specials = ["<unk>", *([eos] if eos else [])]
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True) for t in specials])
    backend.add_special_tokens([AddedToken(sentinel.format(i), special=True) for i in range(NUM_SENTINELS)])
    if eos:
        backend.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    return Tokenizer(backend, None, [vocab[eos]] if eos else [])


def model_config(tokenizer: Tokenizer, encoder_decoder: bool, model_type: str = "t5", **kw) -> ModelConfig:
    return ModelConfig(model_type=model_type, vocab_size=kw.pop("vocab_size", tokenizer.vocab_size), hidden_size=8,
                       num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, intermediate_size=8,
                       max_position_embeddings=64, norm_eps=1e-6, hidden_act="relu", tie_word_embeddings=False,
                       is_encoder_decoder=encoder_decoder, **kw)


T5_TOKENIZER = word_tokenizer("<extra_id_{}>", "</s>")
T5 = fill_format(model_config(T5_TOKENIZER, True), T5_TOKENIZER, T5_TOKENIZER.eos_ids)
EOS = T5_TOKENIZER.token_to_id("</s>")
S = [T5_TOKENIZER.token_to_id(f"<extra_id_{i}>") for i in range(NUM_SENTINELS)]


def w(text: str) -> list[int]:
    return T5_TOKENIZER.encode(text, add_special_tokens=False)


def bminf_positions(prompt: str) -> list[int]:
    """BMInf's loop: `find("<span>")` from just past the previous one."""
    positions, start = [], 0
    while (pos := prompt.find(SPAN, start)) != -1:
        positions.append(pos)
        start = pos + len(SPAN)
    return positions


def parse(prompt: str, output: list[int], stop: tuple[str, ...] = ()) -> FillRequest:
    fill = FillRequest(T5, T5_TOKENIZER, prompt)
    for token in output:
        fill.feed(token)
    fill.finish(stop)
    return fill


# --- splitting --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, pieces, positions", [
    ("今天<span>，我们<span>。", ("今天", "，我们", "。"), (2, 11)),
    ("The <span> walks in <span> park", ("The ", " walks in ", " park"), (4, 20)),
    ("<span><span>", ("", "", ""), (0, 6)),
    ("<span> at the start", ("", " at the start"), (0,)),
    ("at the end: <span>", ("at the end: ", ""), (12,)),
    ("<spa<span>n> <span", ("<spa", "n> <span"), (4,)),
])
def test_split_blanks_cuts_at_each_span_with_bminf_positions(prompt, pieces, positions):
    template = split_blanks(prompt)
    assert template.pieces == pieces and template.positions == positions
    assert list(positions) == bminf_positions(prompt)
    assert template.fill([SPAN] * len(positions)) == prompt


@pytest.mark.parametrize("count", [0, MAX_BLANKS + 1])
def test_split_blanks_refuses_no_span_and_too_many_naming_the_count(count):
    with pytest.raises(BlankCountError, match=f"1 to {MAX_BLANKS} <span> blanks; it holds {count}$") as e:
        split_blanks("x" + "y<span>" * count)
    assert isinstance(e.value, ValueError) and (e.value.count, e.value.limit) == (count, MAX_BLANKS)
    assert split_blanks("<span>" * MAX_BLANKS).positions[-1] == 6 * (MAX_BLANKS - 1)


def no_span(text: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return text.filter(lambda t: SPAN not in t)


@given(st.lists(no_span(st.text(max_size=8)), min_size=2, max_size=MAX_BLANKS + 1))
def test_split_blanks_inverts_joining_at_span(pieces):
    prompt = SPAN.join(pieces)
    template = split_blanks(prompt)
    assert list(template.pieces) == pieces
    assert list(template.positions) == bminf_positions(prompt)


# --- the sentinel format (T5, CPM-2) ----------------------------------------------------------------


def test_t5_input_is_the_text_with_sentinel_ids_for_the_blanks_then_eos():
    assert isinstance(T5, SentinelFormat) and T5.sentinel_ids == tuple(S) and T5.max_blanks == MAX_BLANKS
    fill = FillRequest(T5, T5_TOKENIZER, "the <span> sat on <span> mat")
    assert fill.prompt_ids == [*w("the"), S[0], *w("sat on"), S[1], *w("mat"), EOS]
    assert fill.stop_token_ids == tuple(S[2:])  # the sentinel after the last blank ends the output
    adjacent = FillRequest(T5, T5_TOKENIZER, "<span><span>")
    assert adjacent.prompt_ids == [S[0], S[1], EOS]


def test_sentinel_text_in_the_prompt_stays_text():
    fill = FillRequest(T5, T5_TOKENIZER, "the <extra_id_1> cat <span>")
    assert fill.prompt_ids.count(S[0]) == 1 and S[1] not in fill.prompt_ids
    assert fill.prompt_ids[-2:] == [S[0], EOS]


def test_cpm2_style_sentinels_are_found_and_the_input_has_no_eos_without_a_post_processor():
    tokenizer = word_tokenizer("<s_{}>", None)
    fmt = fill_format(model_config(tokenizer, True, "cpm2"), tokenizer)
    s = [tokenizer.token_to_id(f"<s_{i}>") for i in range(3)]
    assert isinstance(fmt, SentinelFormat) and fmt.sentinel_ids[:3] == tuple(s)
    ids = FillRequest(fmt, tokenizer, "今天<span>我们<span>").prompt_ids
    assert ids == [*tokenizer.encode("今天", add_special_tokens=False), s[0],
                   *tokenizer.encode("我们", add_special_tokens=False), s[1]]


def test_sentinels_the_model_has_no_embedding_for_are_not_used():
    fmt = fill_format(model_config(T5_TOKENIZER, True, vocab_size=S[3]), T5_TOKENIZER)
    assert fmt.sentinel_ids == tuple(S[:3]) and fmt.max_blanks == 3
    with pytest.raises(BlankCountError, match="1 to 3 <span> blanks; it holds 4"):
        FillRequest(fmt, T5_TOKENIZER, "<span>" * 4)


def test_models_without_sentinels_or_fim_tokens_cannot_fill():
    plain = word_tokenizer("<mask_{}>", "</s>")
    with pytest.raises(UnsupportedTaskError, match=r"\(bart\) is encoder-decoder .* no sentinel"):
        fill_format(model_config(plain, True, "bart"), plain)
    # Sentinels make no FIM model of a decoder-only one.
    with pytest.raises(UnsupportedTaskError, match=r"\(gpt2\) is decoder-only without fill-in-the-middle"):
        fill_format(model_config(T5_TOKENIZER, False, "gpt2"), T5_TOKENIZER)


@pytest.mark.parametrize("output, texts", [
    ([S[0], *w("cat"), S[1], *w("a dog"), S[2]], ["cat", "a dog"]),  # well formed
    ([S[0], *w("cat"), S[1], *w("a dog"), EOS], ["cat", "a dog"]),  # EOS instead of the last sentinel
    ([S[0], *w("cat"), S[1], *w("a dog")], ["cat", "a dog"]),  # ran out of tokens
    ([S[0], S[1], S[2]], ["", ""]),  # empty spans
    ([S[0], *w("cat"), S[2]], ["cat", ""]),  # <extra_id_1> missing
    ([*w("cat"), S[1], *w("dog")], ["", "dog"]),  # <extra_id_0> missing: what precedes it belongs to no blank
    ([*w("the cat sat")], ["", ""]),  # no sentinel at all
    ([], ["", ""]),  # nothing at all
    ([S[0], *w("cat"), S[0], *w("dog"), S[1], *w("mat")], ["cat", "mat"]),  # repeated: what follows is dropped
    ([S[1], *w("dog"), S[0], *w("cat"), S[2]], ["", "dog"]),  # out of order: going back is dropped
    ([S[0], *w("cat"), EOS, S[1], *w("dog")], ["cat", ""]),  # EOS early: nothing after it counts
    ([S[0], *w("cat"), S[7], S[1], *w("dog")], ["cat", ""]),  # a sentinel past the last blank ends it
    ([S[0], *w("cat"), S[1], *w("dog"), S[0], *w("mat"), S[1]], ["cat", "dog"]),  # a second round is dropped
])
def test_t5_output_parses_into_blanks_whatever_its_shape(output, texts):
    fill = parse("the <span> sat on <span> mat", output)
    assert [(b.index, b.position, b.text) for b in fill.blanks] == [(0, 4, texts[0]), (1, 18, texts[1])]
    assert fill.text == f"the {texts[0]} sat on {texts[1]} mat"


def test_blanks_complete_as_soon_as_a_later_sentinel_shows_it():
    fill = FillRequest(T5, T5_TOKENIZER, "<span> a <span> b <span> c <span>")
    steps = [fill.feed(t) for t in [S[0], *w("cat"), S[2], *w("dog"), S[3]]]
    completed = [[b.index for b in blanks] for blanks in steps]
    assert completed == [[], [], [0, 1], [], [2]]
    assert [b.text for b in fill.blanks] == ["cat", "", "dog"]
    assert [b.index for b in fill.finish()] == [3]
    assert fill.finish() == [] and fill.feed(S[3]) == [] and len(fill.blanks) == 4


def test_a_stop_string_cuts_the_blank_it_ended():
    fill = parse("the <span> sat on <span> mat", [S[0], *w("cat"), S[1], *w("a dog walks")], stop=("walks",))
    assert [b.text for b in fill.blanks] == ["cat", "a dog "]


PROMPT_PARTS = [*WORDS, " ", "<", "span>", "x", "。"]
SENTINEL_PROMPT_TEXT = no_span(st.lists(st.sampled_from(PROMPT_PARTS), max_size=6).map("".join))
OUTPUT_IDS = st.lists(st.one_of(st.sampled_from([*S[:4], EOS]), st.integers(0, T5_TOKENIZER.vocab_size - 1)),
                      max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.lists(SENTINEL_PROMPT_TEXT, min_size=2, max_size=MAX_BLANKS + 1), OUTPUT_IDS)
def test_any_output_gives_every_blank_once_and_the_prompt_unchanged_around_them(pieces, output):
    prompt = SPAN.join(pieces)
    fill = FillRequest(T5, T5_TOKENIZER, prompt)
    emitted = [b for token in output for b in fill.feed(token)] + fill.finish()
    n = len(pieces) - 1
    assert emitted == fill.blanks and [b.index for b in emitted] == list(range(n))
    assert [b.position for b in emitted] == bminf_positions(prompt)
    expected = pieces[0] + "".join(b.text + p for b, p in zip(emitted, pieces[1:], strict=True))
    assert fill.text == expected


# --- fill-in-the-middle on a tiny LLaMA -------------------------------------------------------------


@pytest.fixture(scope="module")
def fim_engine(fim_llama_dir):
    return Engine.from_dir(fim_llama_dir, device="cpu", dtype="fp32", max_batch_size=2, context=128)


@pytest.fixture(scope="module")
def fim_ids(fim_engine):
    return {t: fim_engine.tokenizer.token_to_id(t) for t in
            ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>", "<|endoftext|>")}


def test_fim_format_is_found_in_the_vocabulary(fim_engine, fim_ids):
    fmt = fill_format(fim_engine.config, fim_engine.tokenizer, fim_engine.eos_ids)
    assert fmt == FimFormat(fim_ids["<fim_prefix>"], fim_ids["<fim_suffix>"], fim_ids["<fim_middle>"],
                            (fim_ids["<|endoftext|>"], fim_ids["<fim_pad>"]), frozenset(fim_engine.eos_ids))
    with pytest.raises(BlankCountError, match="exactly 1 <span> blank for a fill-in-the-middle model; it holds 2"):
        FillRequest(fmt, fim_engine.tokenizer, "a<span>b<span>")


def test_fim_prompt_is_prefix_suffix_middle_and_the_engine_gets_it(fim_engine, fim_ids, monkeypatch):
    tokenizer = fim_engine.tokenizer
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))"
    received = []
    add_request = fim_engine.add_request
    monkeypatch.setattr(fim_engine, "add_request", lambda ids, params: received.append(ids) or add_request(ids, params))
    result = fill_blank(fim_engine, prefix + SPAN + suffix, temperature=0, max_tokens=6)
    assert received == [[tokenizer.bos_id, fim_ids["<fim_prefix>"], *tokenizer.encode(prefix, False),
                         fim_ids["<fim_suffix>"], *tokenizer.encode(suffix, False), fim_ids["<fim_middle>"]]]
    middle = result.blanks[0].text
    assert [(b.index, b.position) for b in result.blanks] == [(0, len(prefix))]
    assert result.text == prefix + middle + suffix
    assert result.prompt_tokens == len(received[0]) and 1 <= result.completion_tokens <= 6
    plain = fim_engine.generate(received[0], temperature=0, max_tokens=6)
    assert result.finish_reason == plain.finish_reason and middle == tokenizer.decode(plain.token_ids)


def test_sentinel_text_in_a_fim_prompt_stays_text(fim_engine, fim_ids):
    fmt = fill_format(fim_engine.config, fim_engine.tokenizer, fim_engine.eos_ids)
    ids = FillRequest(fmt, fim_engine.tokenizer, "<fim_suffix><span><fim_middle>").prompt_ids
    assert ids.count(fim_ids["<fim_suffix>"]) == ids.count(fim_ids["<fim_middle>"]) == 1


@pytest.fixture(scope="module")
def ending_engine(tmp_path_factory, fim_tokenizer_dir):
    """A tiny LLaMA whose LM head scores only <|endoftext|> (+h₀) and <fim_pad> (-h₀): its greedy next token is
    always one of the two FIM end tokens."""
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**{**TINY_LLAMA, "vocab_size": 520}))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[512, 0], model.lm_head.weight[516, 0] = 100.0, -100.0
    path = save_tiny_model(model, tmp_path_factory.mktemp("fim-ending"), fim_tokenizer_dir)
    return Engine.from_dir(path, device="cpu", dtype="fp32", max_batch_size=1, context=64)


def test_fim_generation_stops_at_the_fim_end_token(ending_engine):
    result = fill_blank(ending_engine, "x = <span>\n", temperature=0, max_tokens=8)
    assert result.finish_reason is FinishReason.STOP and result.completion_tokens == 1
    assert result.blanks[0].text == "" and result.text == "x = \n"
    # The same prompt without the end tokens as stop tokens runs to max_tokens on them.
    tokenizer = ending_engine.tokenizer
    fill = FillRequest(fill_format(ending_engine.config, tokenizer), tokenizer, "x = <span>\n")
    plain = ending_engine.generate(fill.prompt_ids, temperature=0, max_tokens=8)
    assert plain.finish_reason is FinishReason.LENGTH and set(plain.token_ids) <= {512, 516}


def test_stop_token_ids_end_generation_with_stop(fim_engine):
    prompt = fim_engine.tokenizer.encode("The quick brown fox")
    free = fim_engine.generate(prompt, temperature=0, max_tokens=8, ignore_eos=True)
    stopped = fim_engine.generate(prompt, temperature=0, max_tokens=8, ignore_eos=True,
                                  stop_token_ids=[free.token_ids[2]])
    cut = free.token_ids.index(free.token_ids[2]) + 1
    assert stopped.token_ids == free.token_ids[:cut] and stopped.finish_reason is FinishReason.STOP
    assert free.text.startswith(stopped.text)


def test_demo_llama_cannot_fill_blanks():
    engine = Engine.from_dir(demo_models.path(), device="cpu", dtype="fp32", max_batch_size=1, context=64)
    with pytest.raises(UnsupportedTaskError, match=r"\(llama\) is decoder-only"):
        fill_blank(engine, "今天<span>，我们<span>。")


def test_cli_fill_blank_prints_the_blanks_or_says_why_it_cannot(fim_llama_dir, capsys):
    from vramlite.server.cli import main

    assert main(["fill-blank", "--model", str(fim_llama_dir), "--device", "cpu", "--max-tokens", "4",
                 "--temperature", "0", "--json", "def f(x):<span>\nprint(f(2))"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert [b["index"] for b in reply["blanks"]] == [0] and reply["blanks"][0]["position"] == 9
    assert reply["text"] == "def f(x):" + reply["blanks"][0]["text"] + "\nprint(f(2))"
    assert main(["fill-blank", "--model", str(demo_models.path()), "--device", "cpu", "a<span>b"]) == 2
    assert "cannot fill blanks" in capsys.readouterr().err
