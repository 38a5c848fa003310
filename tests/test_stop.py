"""StopMatcher: stop strings across chunk boundaries, held-back prefixes and flushing."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vramlite.engine.stop import StopMatcher


def reference(text: str, stops: list[str], keep: bool = False) -> tuple[str, bool]:
    """Cut `text` before the stop string that is completed first (the longest if several end together), or
    with `keep` after it."""
    hits = [(text.find(s) + len(s), -len(s)) for s in stops if s in text]
    if not hits:
        return text, False
    end, neg_len = min(hits)
    return text[: end if keep else end + neg_len], True


def stream(chunks: list[str], stops: list[str], keep: bool = False) -> tuple[str, bool]:
    """Feed chunks until a stop is hit, as the engine does, and return what was emitted."""
    matcher = StopMatcher(stops, keep=keep)
    emitted = []
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        emitted.append(out)
        if stopped:
            return "".join(emitted), True
    emitted.append(matcher.flush())
    return "".join(emitted), False


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in pairwise(points)]


# A small alphabet (with CJK) so stop strings occur and overlap often.
alphabet = st.sampled_from("ab c\n停止好")
stops = st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=0, max_size=4)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet, max_size=30), stop=stops, cuts=st.lists(st.integers(0, 40), max_size=10),
       keep=st.booleans())
def test_any_chunking_matches_the_reference_cut(text: str, stop: list[str], cuts: list[int], keep: bool) -> None:
    assert stream(split(text, cuts), stop, keep) == reference(text, stop, keep)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet, max_size=30), stop=stops)
def test_holds_back_exactly_the_longest_tail_that_may_start_a_stop(text: str, stop: list[str]) -> None:
    matcher = StopMatcher(stop)
    emitted = ""
    for i, ch in enumerate(text, start=1):
        out, stopped = matcher.feed(ch)
        emitted += out
        if stopped:
            return
        fed = text[:i]
        held = fed[len(emitted) :]
        assert fed.startswith(emitted)
        possible = [n for n in range(1, len(fed) + 1) if any(s.startswith(fed[-n:]) for s in stop)]
        assert len(held) == max(possible, default=0)


def test_stop_split_across_chunks_is_removed() -> None:
    m = StopMatcher(["</s>"])
    assert m.feed("Hello <") == ("Hello ", False)
    assert m.feed("/") == ("", False)
    assert m.feed("s> tail") == ("", True)
    assert m.matched == "</s>" and m.stopped
    assert m.feed("more") == ("", True)
    assert m.flush() == ""


def test_false_start_is_released() -> None:
    m = StopMatcher(["</s>"])
    assert m.feed("a </") == ("a ", False)
    assert m.feed("p>") == ("</p>", False)
    assert m.feed("<") == ("", False)
    assert m.flush() == "<"


def test_chinese_stop_strings() -> None:
    assert stream(["你好", "，再", "见。以后"], ["再见"]) == ("你好，", True)
    assert stream(["句号", "。", "继续"], ["。"]) == ("句号", True)
    assert stream(["再", "来"], ["再见"]) == ("再来", False)


def test_overlapping_stop_strings() -> None:
    # "ab" completes before "abc" could, so it wins even though both start at the same place.
    assert stream(["xab", "c"], ["abc", "ab"]) == ("x", True)
    # Both end on the same character: the longer one starts earlier and wins.
    assert stream(["xa", "bc"], ["bc", "abc"]) == ("x", True)
    # A stop that is a suffix of another's prefix: "aab" must not be missed after "aa".
    assert stream(["a", "a", "a", "b"], ["aab"]) == ("a", True)


def test_stop_at_the_very_start() -> None:
    assert stream(["STOP here"], ["STOP"]) == ("", True)
    assert stream(["S", "T", "O", "P"], ["STOP"]) == ("", True)


def test_no_stop_strings_passes_everything_through() -> None:
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def test_rejects_empty_stop_string_and_bare_string() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["a", ""])
    with pytest.raises(TypeError):
        StopMatcher("abc")
