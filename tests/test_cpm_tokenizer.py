"""The CPM (jieba + WordPiece `vocab.txt`) tokenizer against transformers' CpmAntTokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("jieba")  # not on a GPU host with only the engine's packages: see conftest

import jieba

from vramlite.engine.cpm_tokenizer import CpmTokenizer
from vramlite.engine.detokenizer import IncrementalDetokenizer
from vramlite.engine.errors import ModelLoadError
from vramlite.engine.tokenizer import Tokenizer

SENTENCES = """床前明月光，疑是地上霜。举头望明月，低头思故乡。
白日依山尽，黄河入海流。欲穷千里目，更上一层楼。
春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
千里之行，始于足下。学而时习之，不亦说乎？有朋自远方来，不亦乐乎！
今天天气很好，我们一起去公园散步吧。这个模型可以生成中文和英文。
服务器把生成的文字一个一个地发送给客户端。自然语言处理是人工智能的一个重要方向。
"""
# CPM-Ant's vocab.txt starts with these, in this order.
SPECIALS = ["<d>", "</d>", "<s>", "</s>", "</_>", "<unk>", "<pad>", "</n>"]
SENTINELS = [f"<s_{i}>" for i in range(190)]  # CPM-2's
CHARS = sorted(set(SENTENCES) - {"\n"})
ASCII = [chr(c) for c in range(0x21, 0x7F)]

SAMPLES = [
    "床前明月光，疑是地上霜。",
    "今天天气很好，我们一起去公园散步吧。",
    "自然语言处理是人工智能的一个重要方向",
    "mixed 中文 and English: 今天天气很好 today!",
    "CPM-Ant 有 10B 参数，BMInf 在 GTX 1060 上运行。",
    "a  b   c",
    "  leading and trailing  ",
    "line one\nline two\n\n第四行\n",
    "tabs\tand\r\nCRLF",
    "全角\u3000空格",
    "龘 is rare, so is 😀",
    "",
    " ",
    "\n",
    "，。！？",
    "x" * 250 + " long word",
]
INJECTIONS = ["</s>", "<s>", "<unk>", "<pad>", "<d>你好</d>", "x</s>y", "说 <s> 然后 </s>。", "<s_0>明月"]

# Random text: characters and jieba words from the vocabulary, characters outside it, whitespace,
# ASCII runs and special-token strings.
ALPHABET = [*"床前明月光疑是地上霜，。！？你好天气公园龘鬱😀é", "明月", "故乡", "人工智能", "一个",
            " ", "  ", "\n", "\t", "\r\n", "\u3000", "abc", "GTX", "1060", "3.14", "-", "</s>", "<s>", "<d>"]
texts = st.lists(st.sampled_from(ALPHABET), max_size=24).map("".join)
# Text the vocabulary covers completely, so it decodes back unchanged.
IN_VOCAB = [*"床前明月光疑是地上霜，。！？天气公园", "明月", "故乡", " ", "\n", "abc", "GTX", "1060", "</s>"]


def write_vocab(directory: Path, tokenizer_config: dict[str, Any] | None = None) -> Path:
    """A small CPM-style vocab.txt: CPM-Ant's special tokens, every character and jieba word of SENTENCES,
    printable ASCII and a few English words, CPM-2's `<s_N>` sentinels."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = SENTENCES.splitlines()
    words = [w for line in lines for w in jieba.cut(line, HMM=False) if len(w) > 1]
    # Pairs across word boundaries too, so that a different segmentation gives different ids.
    pairs = [line[i : i + 2] for line in lines for i in range(0, len(line) - 1, 3)]
    extra = ["the", "and", "English", "Ant"]
    tokens = list(dict.fromkeys([*SPECIALS, *CHARS, *ASCII, *words, *pairs, *extra, *SENTINELS]))
    (directory / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    if tokenizer_config is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return directory


@pytest.fixture(scope="module")
def cpm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocab(tmp_path_factory.mktemp("cpm"), {"tokenizer_class": "CpmAntTokenizer"})


@pytest.fixture(scope="module")
def ours(cpm_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(cpm_dir)


@pytest.fixture(scope="module")
def hf(cpm_dir: Path) -> Any:
    from transformers import CpmAntTokenizer

    return CpmAntTokenizer(str(cpm_dir / "vocab.txt"))


def reference_ids(hf: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """transformers' ids with special-token strings treated as text (not its default)."""
    return hf.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True)


def test_loads_as_cpm_tokenizer(ours: Tokenizer) -> None:
    assert isinstance(ours, CpmTokenizer)
    assert (ours.bos_id, ours.eos_ids) == (2, (3,))
    assert ours.special_ids == {0, 1, 2, 3, 5, 6}  # <d> </d> <s> </s> <unk> <pad>


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_ids_match_transformers(ours: Tokenizer, hf: Any, add_special_tokens: bool) -> None:
    for text in SAMPLES + INJECTIONS:
        assert ours.encode(text, add_special_tokens) == reference_ids(hf, text, add_special_tokens), text


def test_parse_special_matches_transformers_default(ours: Tokenizer, hf: Any) -> None:
    for text in SAMPLES + INJECTIONS:
        assert ours.encode(text, parse_special=True) == hf.encode(text), text


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_ids_match_transformers_on_random_text(ours: Tokenizer, hf: Any, text: str) -> None:
    assert ours.encode(text) == reference_ids(hf, text)
    assert ours.encode(text, parse_special=True) == hf.encode(text)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from([*CHARS, *"龘鬱丐丑"]), max_size=30))
def test_ids_match_transformers_on_random_chinese(ours: Tokenizer, hf: Any, text: str) -> None:
    assert ours.encode(text) == reference_ids(hf, text)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_decode_matches_transformers(ours: Tokenizer, hf: Any, data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, ours.vocab_size - 1), max_size=20))
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@settings(max_examples=200, deadline=None)
@given(text=st.lists(st.sampled_from(IN_VOCAB), max_size=24).map("".join))
def test_round_trip(ours: Tokenizer, text: str) -> None:
    assert ours.decode(ours.encode(text)) == text


def test_unknown_characters_become_unk(ours: Tokenizer) -> None:
    unk = ours.token_to_id("<unk>")
    assert ours.encode("龘明月", add_special_tokens=False) == [unk, ours.token_to_id("明月")]
    assert ours.decode(ours.encode("龘明月")) == "明月"
    assert ours.decode(ours.encode("龘明月"), skip_special_tokens=False) == "<s><unk>明月"


def test_special_token_strings_are_text(ours: Tokenizer) -> None:
    eos = ours.token_to_id("</s>")
    for text in ("stop </s> here", "<d>明月</d>", "<s>"):
        ids = ours.encode(text, add_special_tokens=False)
        assert not set(ids) & ours.special_ids, text
        assert ours.decode(ids) == text
    assert eos in ours.encode("stop </s> here", parse_special=True)


def test_space_and_newline_tokens(ours: Tokenizer, cpm_dir: Path) -> None:
    lines = (cpm_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    space, line = lines.index("</_>"), lines.index("</n>")
    assert ours.encode("明月 光\n", add_special_tokens=False) == [
        ours.token_to_id("明月"), space, ours.token_to_id("光"), line]
    assert ours.token_to_id(" ") == space
    assert ours.token_to_id("</_>") is None  # as in transformers: the marker is renamed, not kept
    assert ours.vocab_size == len(lines) - 1


def test_sentinels(ours: Tokenizer, cpm_dir: Path) -> None:
    lines = (cpm_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")
    assert [ours.sentinel_id(i) for i in (0, 1, 189)] == [lines.index(f"<s_{i}>") for i in (0, 1, 189)]
    assert ours.sentinel_id(190) is None
    # A sentinel is a vocabulary entry, not a special token: user text spelling it stays text.
    assert ours.sentinel_id(0) not in ours.encode("<s_0>明月")
    assert ours.decode([ours.token_to_id("明月"), ours.sentinel_id(0)]) == "明月<s_0>"


def test_incremental_detokenizer(ours: Tokenizer) -> None:
    rng = random.Random(0)
    prompt = ours.encode("举头望明月，")
    for _ in range(20):
        generated = ours.encode("".join(rng.choice(ALPHABET) for _ in range(12)), add_special_tokens=False)
        generated.insert(rng.randrange(len(generated) + 1), ours.eos_ids[0])
        detok = IncrementalDetokenizer(ours, prompt)
        pieces = [detok.add(t) for t in generated]
        assert "".join(pieces) + detok.flush() == ours.decode(generated)


def test_directory_detection(cpm_dir: Path, tmp_path: Path) -> None:
    bare = write_vocab(tmp_path / "bare")  # vocab.txt alone
    assert isinstance(Tokenizer.from_dir(bare), CpmTokenizer)
    bert = write_vocab(tmp_path / "bert", {"tokenizer_class": "BertTokenizer"})
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.json or tokenizer\.model"):
        Tokenizer.from_dir(bert)


def test_config_token_names_and_model_eos(tmp_path: Path) -> None:
    directory = write_vocab(tmp_path, {"tokenizer_class": "CpmAntTokenizer", "eos_token": "</d>",
                                       "bos_token": {"content": "<d>", "special": True}})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    tok = Tokenizer.from_dir(directory)
    assert (tok.bos_id, tok.eos_ids) == (0, (1, 3, 7))
    assert tok.encode("明月")[0] == 0


@pytest.mark.parametrize(("drop", "message"), [("</_>", "no '</_>' entry"), ("<unk>", "no unknown token")])
def test_incomplete_vocab(tmp_path: Path, drop: str, message: str) -> None:
    directory = write_vocab(tmp_path, {"tokenizer_class": "CpmAntTokenizer"})
    vocab = directory / "vocab.txt"
    vocab.write_text(vocab.read_text(encoding="utf-8").replace(drop + "\n", ""), encoding="utf-8")
    with pytest.raises(ModelLoadError, match=message):
        Tokenizer.from_dir(directory)


def test_missing_vocab(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CpmAntTokenizer"}))
    with pytest.raises(ModelLoadError, match=r"vocab\.txt is not a readable vocabulary"):
        Tokenizer.from_dir(tmp_path)
