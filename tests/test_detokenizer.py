"""vramlite.engine.detokenizer: streamed text equals the full decode, never half a character."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenizer import build_gpt2_dir, build_llama_dir, texts

from vramlite.engine.detokenizer import IncrementalDetokenizer
from vramlite.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    # "\n" as a user-defined piece, like the demo model.
    return Tokenizer.from_dir(build_llama_dir(tmp_path_factory.mktemp("llama"), user_defined=("\n",)))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_gpt2_dir(tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tokenizer(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tokenizer: Tokenizer, prompt: Sequence[int], generated: Sequence[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(t) for t in generated]
    assert detok.text == "".join(pieces)
    return pieces


def complete_prefix(tokenizer: Tokenizer, ids: list[int]) -> str:
    """The text of prompt `ids` up to its last complete character, which the stream does not repeat.

    For valid ids without a literal U+FFFD. Byte fallback shows a whole byte run cut mid-character as
    U+FFFD, so the longest token prefix that decodes cleanly; byte-level BPE can split a character
    between tokens with no clean token boundary near, so also the text without its U+FFFD tail.
    """
    prefixes = (tokenizer.decode(ids[:end]) for end in range(len(ids), -1, -1))
    by_token = next(text for text in prefixes if not text.endswith("\ufffd"))
    return max(by_token, tokenizer.decode(ids).rstrip("\ufffd"), key=len)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=texts)
def test_stream_equals_decode(tokenizer: Tokenizer, data: st.DataObject, text: str) -> None:
    ids = tokenizer.encode(text)
    # Cut anywhere, also inside a character's byte tokens, and sprinkle special tokens in.
    cut = data.draw(st.integers(0, len(ids)))
    specials = sorted(tokenizer.special_ids)
    generated = ids[cut:]
    for _ in range(data.draw(st.integers(0, 2))):
        generated.insert(data.draw(st.integers(0, len(generated))), data.draw(st.sampled_from(specials)))
    pieces = stream(tokenizer, ids[:cut], generated)
    assert complete_prefix(tokenizer, ids[:cut]) + "".join(pieces) == tokenizer.decode(ids[:cut] + generated)
    assert not any("\ufffd" in p for p in pieces)  # the alphabet has no U+FFFD: only half characters would
    if ids[:cut] in ([], [tokenizer.bos_id]):
        assert "".join(pieces) == tokenizer.decode(generated)


def test_byte_fallback_waits_for_the_whole_character(llama: Tokenizer) -> None:
    ids = llama.encode("龘", add_special_tokens=False)  # not in the vocabulary: 4 tokens, ▁ and 3 bytes
    assert [llama.decode([i], skip_special_tokens=False) for i in ids[1:]] == ["\ufffd"] * 3
    assert stream(llama, [llama.bos_id], ids) == ["", "", "", "龘"]


def test_emoji_in_byte_level_bpe(gpt2: Tokenizer) -> None:
    prompt = gpt2.encode("Look:")
    ids = gpt2.encode(" 😀🎉", add_special_tokens=False)
    pieces = stream(gpt2, prompt, ids)
    assert "".join(pieces) == " 😀🎉"
    assert "" in pieces  # each emoji is several byte tokens


def test_leading_space_is_kept(llama: Tokenizer) -> None:
    prompt = llama.encode("Hello,")
    generated = llama.encode(" world", add_special_tokens=False)
    assert llama.decode(generated) == "world"  # decoded alone, the word loses its space
    assert "".join(stream(llama, prompt, generated)) == " world"


def test_prompt_cut_inside_a_character(llama: Tokenizer) -> None:
    ids = llama.encode("a龘b")
    cut = ids.index(llama.token_to_id("<0xE9>")) + 1  # after the first of 龘's bytes (E9 BE 98)
    assert llama.decode(ids[:cut]).endswith("\ufffd")
    assert "".join(stream(llama, ids[:cut], ids[cut:])) == "龘b"


def test_special_tokens_give_no_text(llama: Tokenizer) -> None:
    prompt = llama.encode("Hi")
    word = llama.encode(" the", add_special_tokens=False)
    assert stream(llama, prompt, [2, *word, 0, *word]) == ["", " the", "", " the"]


def test_empty_prompt(gpt2: Tokenizer) -> None:
    ids = gpt2.encode("床前明月光")
    assert "".join(stream(gpt2, [], ids)) == "床前明月光"


def test_cost_per_token_is_constant(llama: Tokenizer) -> None:
    class Counting:
        longest = 0

        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            self.longest = max(self.longest, len(ids))
            return llama.decode(ids, skip_special_tokens)

    counting = Counting()
    text = "床前明月光，疑是地上霜。龘 The quick brown fox. " * 40
    ids = llama.encode(text)
    detok = IncrementalDetokenizer(counting, ids[:50])  # type: ignore[arg-type]
    for t in ids[50:]:
        detok.add(t)
    assert complete_prefix(llama, ids[:50]) + detok.text == llama.decode(ids)
    assert counting.longest <= 12



@given(st.data())
@settings(max_examples=40, deadline=None)
def test_a_candidates_text_is_what_it_would_bring_out(tokenizer: Tokenizer, data: st.DataObject) -> None:
    """For log-probabilities: each candidate's text is the text that adding it brings out, leading space
    included, whatever came before; a candidate that would end inside a character shows it as U+FFFD."""
    ids = tokenizer.encode(data.draw(texts), add_special_tokens=False)
    cut = data.draw(st.integers(0, len(ids)))
    detok = IncrementalDetokenizer(tokenizer, ids[:cut])
    candidates = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=4))
    texts_before = detok.candidate_texts(candidates)
    for token, text in zip(candidates, texts_before, strict=True):
        probe = IncrementalDetokenizer(tokenizer, ids[:cut])
        brought = probe.add(token)
        assert text == (brought or text)  # what `add` brings out, unless it holds a character back
        assert brought or text.endswith("\ufffd") or text == ""


def test_special_tokens_bring_out_their_text_unless_skipped(fim_tokenizer_dir):
    tok = Tokenizer.from_dir(fim_tokenizer_dir)
    prompt = tok.encode("The quick")
    prefix, middle = tok.token_to_id("<fim_prefix>"), tok.token_to_id("<fim_middle>")
    word = tok.encode(" fox", add_special_tokens=False)
    ids = [prefix, *word, middle]
    shown = IncrementalDetokenizer(tok, prompt, skip_special_tokens=False)
    assert "".join(shown.add(t) for t in ids) == tok.decode([*prompt, *ids], skip_special_tokens=False)[
        len(tok.decode(prompt, skip_special_tokens=False)):] == "<fim_prefix> fox<fim_middle>"
    skipped = IncrementalDetokenizer(tok, prompt)
    assert "".join(skipped.add(t) for t in ids) == " fox"
