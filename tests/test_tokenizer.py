"""engine.tokenizer against transformers' AutoTokenizer, on tiny tokenizers trained here."""

from __future__ import annotations

import importlib.util
import io
import json
import random
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from vramlite.engine.errors import ModelLoadError
from vramlite.engine.tokenizer import Tokenizer

ENGLISH = """The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
A journey of a thousand miles begins with a single step, said the old man.
In 1984 there were 365 days, 52 weeks and 12 months; in 2024 there were 366 days.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
Do not count your chickens before they hatch. Fortune favors the bold!
Hello, world. How are you today? I am fine, thank you very much.
The serving engine streams tokens to the client as soon as they are decoded.
Programs must be written for people to read, and only incidentally for machines to execute.
"""
CHINESE = """床前明月光，疑是地上霜。举头望明月，低头思故乡。
白日依山尽，黄河入海流。欲穷千里目，更上一层楼。
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
千里之行，始于足下。学而时习之，不亦说乎？有朋自远方来，不亦乐乎！
今天天气很好，我们一起去公园散步吧。这个模型可以生成中文和英文。
服务器把生成的文字一个一个地发送给客户端。
"""

# Strings the reference comparisons run on. "龘", "é", emoji and "\u3000" are not in the tiny
# vocabularies, so they go through byte fallback (sentencepiece) or raw bytes (GPT-2).
SAMPLES = [
    "Hello, world.",
    "The quick brown fox jumps over the lazy dog.",
    "床前明月光，疑是地上霜。",
    "mixed 中文 and English: 今天天气很好 today!",
    "a  b   c    d",
    "  leading spaces",
    " one leading space",
    "trailing spaces   ",
    "line one\nline two\n\nline four\n",
    "\nstarts with a newline",
    "tabs\tand\r\nCRLF",
    "digits 1234567890 and 3.14159",
    "emoji 😀🎉 here",
    "龘 is rare",
    "café naïve",
    "全角\u3000空格",
    "",
    " ",
    "\n",
    "，。！？",
]
# Special-token strings that must stay plain text.
INJECTIONS = ["</s>", "<s>", "<unk>", "<|endoftext|>", "x</s>y", "say <s> then </s>."]

# Text for property tests: single characters (some outside the vocabularies) and whole words.
ALPHABET = [*"abeHTxz 0179\n\t.,，。！？床前明月光你好龘😀🎉é\u3000",
            " the", " sea", "明月", "千里", "</s>", "<|endoftext|>"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=24).map("".join)


def corpus(lines: int = 150, seed: int = 0) -> list[str]:
    """A few KB of English and Chinese lines, shuffled with repeats."""
    pool = (ENGLISH + CHINESE).splitlines()
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(lines)]


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def build_llama_dir(out: Path, user_defined: tuple[str, ...] = ()) -> Path:
    """A LLaMA-style sentencepiece BPE tokenizer.model (unk 0, bos 1, eos 2) and tokenizer_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=500,
        character_coverage=1.0, normalization_rule_name="identity", byte_fallback=True, split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        user_defined_symbols=list(user_defined), unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
    })
    return out


def build_gpt2_dir(out: Path) -> Path:
    """A GPT-2-style byte-level BPE tokenizer.json with <|endoftext|> and tokenizer_config.json."""
    out.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(out / "tokenizer.json"))
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "add_prefix_space": False,
    })
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_llama_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpt2_dir(tmp_path_factory.mktemp("gpt2"))


class Case(NamedTuple):
    kind: str
    ours: Tokenizer
    hf: Any  # transformers' tokenizer


@pytest.fixture(scope="module", params=["llama", "llama-newline", "gpt2"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """Ours and transformers' tokenizer for each tiny model; "llama-newline" has "\\n" as a
    user-defined piece, like the demo model."""
    if importlib.util.find_spec("google.protobuf") is None:
        pytest.fail("transformers reads tokenizer.model only with protobuf installed (pip install protobuf)")
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        build_gpt2_dir(out)
    else:
        build_llama_dir(out, user_defined=("\n",) if request.param == "llama-newline" else ())
    return Case(request.param, Tokenizer.from_dir(out), AutoTokenizer.from_pretrained(out))


def reference_ids(hf: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """transformers' ids with special-token strings treated as text (not its default)."""
    return hf.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True)


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_transformers(case: Case, add_special_tokens: bool) -> None:
    ours, hf = case.ours, case.hf
    for text in SAMPLES + INJECTIONS:
        assert ours.encode(text, add_special_tokens) == reference_ids(hf, text, add_special_tokens), text


def test_parse_special_matches_transformers_default(case: Case) -> None:
    ours, hf = case.ours, case.hf
    for text in SAMPLES + INJECTIONS:
        assert ours.encode(text, parse_special=True) == hf.encode(text), text


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_ids_match_transformers_on_random_text(case: Case, text: str) -> None:
    ours, hf = case.ours, case.hf
    assert ours.encode(text) == reference_ids(hf, text)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_decode_matches_transformers(case: Case, data: st.DataObject) -> None:
    # Arbitrary ids, so also incomplete or invalid byte sequences and special tokens anywhere.
    ours, hf = case.ours, case.hf
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=20))
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@settings(max_examples=150, deadline=None)
@given(text=texts)
def test_round_trip(case: Case, text: str) -> None:
    decoded = case.ours.decode(case.ours.encode(text))
    if case.kind != "gpt2" and text.startswith(" "):
        # transformers' Metaspace adds no "▁" before text that already starts with one, and its decoder
        # strips one leading space: " x" comes back as "x" (sentencepiece itself would keep it).
        assert decoded == text[1:]
    else:
        assert decoded == text


def test_sentencepiece_agrees_but_at_the_start(llama_dir: Path) -> None:
    """The conversion reproduces sentencepiece's own BPE; only a leading space is handled differently."""
    ours = Tokenizer.from_dir(llama_dir)
    sp = spm.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    rng = random.Random(1)
    for _ in range(300):
        text = "x" + "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 20)))
        assert ours.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)) == text
    assert sp.encode(" the", out_type=str) == ["▁", "▁the"]
    assert ours.encode(" the", add_special_tokens=False) == [sp.piece_to_id("▁the")]


def test_special_token_strings_are_text(llama_dir: Path, gpt2_dir: Path) -> None:
    for directory, special in ((llama_dir, "</s>"), (gpt2_dir, "<|endoftext|>")):
        tok = Tokenizer.from_dir(directory)
        special_id = tok.token_to_id(special)
        assert special_id in tok.special_ids
        ids = tok.encode(f"stop {special} here", add_special_tokens=False)
        assert special_id not in ids
        assert tok.decode(ids) == f"stop {special} here"
        assert special_id in tok.encode(f"stop {special} here", parse_special=True)


def test_llama_special_ids(llama_dir: Path) -> None:
    tok = Tokenizer.from_dir(llama_dir)
    assert (tok.bos_id, tok.eos_ids, tok.special_ids) == (1, (2,), frozenset({0, 1, 2}))
    assert tok.vocab_size == 500
    assert tok.encode("Hello")[0] == 1
    assert 1 not in tok.encode("Hello", add_special_tokens=False)
    assert tok.decode([1, *tok.encode("Hello", add_special_tokens=False), 2]) == "Hello"
    assert tok.decode([1, tok.token_to_id("▁H"), 2], skip_special_tokens=False) == "<s> H</s>"
    assert tok.token_to_id("no such piece") is None
    assert tok.chat_template is None


def test_gpt2_special_ids(gpt2_dir: Path) -> None:
    tok = Tokenizer.from_dir(gpt2_dir)
    end = tok.token_to_id("<|endoftext|>")
    assert (tok.bos_id, tok.eos_ids, tok.special_ids) == (end, (end,), frozenset({end}))
    assert tok.vocab_size == 400
    assert end not in tok.encode("Hello")  # GPT-2's post-processor adds no BOS


def test_config_json_and_generation_config_ids(gpt2_dir: Path, tmp_path: Path) -> None:
    shutil.copy(gpt2_dir / "tokenizer.json", tmp_path)  # no tokenizer_config.json: no named tokens
    write_json(tmp_path / "config.json", {"bos_token_id": 0, "eos_token_id": [0, 5]})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [5, 7]})
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids) == (0, (0, 5, 7))


def test_tokenizer_config_options(llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    shutil.copy(llama_dir / "tokenizer.model", tmp_path)
    write_json(tmp_path / "tokenizer_config.json", {
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": False, "add_eos_token": True,
        # The dict form older transformers versions wrote.
        "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},
        "unk_token": "<unk>", "chat_template": "{{ messages }}",
        "added_tokens_decoder": {"500": {"content": "<|im_start|>", "special": True},
                                 "501": {"content": "<|im_end|>", "special": True}},
    })
    tok = Tokenizer.from_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.chat_template == "{{ messages }}"
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, (2,), 502)
    assert tok.special_ids == {0, 1, 2, 500, 501}
    chat = "<|im_start|>user\n你好<|im_end|>"
    assert tok.encode("Hi") == reference_ids(hf, "Hi") == [*tok.encode("Hi", add_special_tokens=False), 2]
    assert tok.encode(chat, parse_special=True) == hf.encode(chat)
    assert 500 not in tok.encode(chat)
    assert tok.decode(tok.encode(chat)) == chat

    (tmp_path / "chat_template.jinja").write_text("{{ jinja_file }}")
    assert Tokenizer.from_dir(tmp_path).chat_template == "{{ jinja_file }}"


def test_added_token_on_wrong_id(llama_dir: Path, tmp_path: Path) -> None:
    shutil.copy(llama_dir / "tokenizer.model", tmp_path)
    write_json(tmp_path / "tokenizer_config.json", {"added_tokens_decoder": {"600": {"content": "<x>"}}})
    with pytest.raises(ModelLoadError, match=r"tokenizer_config.json.*'<x>'.*600"):
        Tokenizer.from_dir(tmp_path)


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=f"no tokenizer.json or tokenizer.model in {tmp_path}"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "absent")


@pytest.mark.parametrize(("name", "content", "message"), [
    ("tokenizer.json", b"{not json", "tokenizer.json is not a HF tokenizers file"),
    ("tokenizer.model", b"\xff\xff\xff", "tokenizer.model is not a sentencepiece model"),
    ("tokenizer.model", b"", "tokenizer.model is not a sentencepiece model: it has no pieces"),
])
def test_unreadable_tokenizer(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        Tokenizer.from_dir(tmp_path)


def test_unreadable_tokenizer_config(llama_dir: Path, tmp_path: Path) -> None:
    shutil.copy(llama_dir / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ModelLoadError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(tmp_path)


def test_unigram_model_is_refused(tmp_path: Path) -> None:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus()), model_writer=model, model_type="unigram",
                                   vocab_size=200, character_coverage=1.0, num_threads=1, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    with pytest.raises(ModelLoadError, match="unigram sentencepiece model; only BPE"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_token_bytes_spell_out_what_decoding_writes(kind: str, llama_dir: Path, gpt2_dir: Path) -> None:
    """Sentencepiece (▁ and <0xNN> byte tokens) and byte-level BPE: the bytes of a run of tokens, joined, are the
    decoded text (structured output matches patterns against them); special tokens have none."""
    tok = Tokenizer.from_dir(llama_dir if kind == "llama" else gpt2_dir)
    spelled = tok.token_bytes()
    text = "Ünïcode — 文字 and\nnew lines, emoji 🎉, {\"json\": [1, 2.5e3]}"
    ids = tok.encode(text, add_special_tokens=False)
    assert any(len(spelled[i]) == 1 and spelled[i][0] >= 0x80 for i in ids)  # partial UTF-8 bytes among them
    assert b"".join(spelled[i] for i in ids).decode() in (text, " " + text)  # sentencepiece's first ▁ included
    assert all(spelled[i] is None for i in tok.special_ids)
