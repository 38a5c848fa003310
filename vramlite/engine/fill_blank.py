"""Fill in the blanks (BMInf's `fill_blank`): a prompt with `<span>` blanks in, the text of each blank out.

A model fills blanks in one of two ways, told apart by its config and its vocabulary:

- encoder-decoder models trained on span corruption (T5's `<extra_id_i>`, CPM-2's `<s_i>`): the encoder
  reads the prompt with its i-th blank replaced by sentinel i, and the decoder writes
  `<s_0> blank 0 <s_1> blank 1 ... <s_n>`; up to 16 blanks.
- decoder-only models trained for fill-in-the-middle (StarCoder, Qwen2.5-Coder, CodeLlama, DeepSeek-Coder):
  one blank, prompted prefix-suffix-middle; the model writes the middle, then an end token.

Sentinel and FIM tokens enter the prompt as ids, never as text, so a prompt holding the string
"<extra_id_0>" keeps it as text. The output is parsed from token ids and never fails: a missing,
repeated or out-of-order sentinel leaves the blanks it skips empty.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from vramlite.engine.config import ModelConfig
from vramlite.engine.errors import UnsupportedTaskError
from vramlite.engine.sampler import SamplingParams
from vramlite.engine.sequence import FinishReason
from vramlite.engine.stop import StopMatcher
from vramlite.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from vramlite.engine.engine import Engine

SPAN = "<span>"
MAX_BLANKS = 16
SENTINEL_STYLES = ("<extra_id_{}>", "<s_{}>")  # T5 and mT5; CPM-2
# (prefix, suffix, middle, the tokens that end the middle besides the model's EOS)
FIM_STYLES = (
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>", ("<|endoftext|>", "<fim_pad>")),  # StarCoder
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", ("<|endoftext|>", "<|fim_pad|>")),  # Qwen2.5-Coder
    ("▁<PRE>", "▁<SUF>", "▁<MID>", ("▁<EOT>", "<EOT>")),  # CodeLlama
    ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>", ()),  # DeepSeek-Coder
)
_PROBE = "a"  # a text to see which special tokens the tokenizer puts around any text


class BlankCountError(ValueError):
    """The prompt holds no blank, or more than the model can fill."""

    def __init__(self, count: int, limit: int, why: str = "") -> None:
        self.count = count
        self.limit = limit
        allowed = "exactly 1 <span> blank" if limit == 1 else f"1 to {limit} {SPAN} blanks"
        super().__init__(f"the prompt must hold {allowed}{why}; it holds {count}")


@dataclass(frozen=True)
class Blank:
    """A filled blank: its index, the character offset of its `<span>` in the prompt, and its text."""

    index: int
    position: int
    text: str


@dataclass(frozen=True)
class Template:
    """A prompt cut at its blanks: the text `pieces` around them (one more than the blanks) and the
    character offset of each blank's `<span>` in the prompt (BMInf's `prompt.find("<span>")`)."""

    pieces: tuple[str, ...]
    positions: tuple[int, ...]

    def fill(self, texts: Sequence[str]) -> str:
        """The prompt with blank i replaced by `texts[i]`; the text around the blanks is unchanged."""
        parts = [self.pieces[0]]
        for text, piece in zip(texts, self.pieces[1:], strict=True):
            parts += (text, piece)
        return "".join(parts)


def split_blanks(prompt: str, max_blanks: int = MAX_BLANKS, why: str = "") -> Template:
    """Cut `prompt` at its `<span>` markers; BlankCountError unless it holds 1 to `max_blanks`."""
    pieces = prompt.split(SPAN)
    count = len(pieces) - 1
    if not 1 <= count <= max_blanks:
        raise BlankCountError(count, max_blanks, why)
    positions = list(itertools.accumulate(len(p) + len(SPAN) for p in pieces[:-1]))
    return Template(tuple(pieces), tuple(end - len(SPAN) for end in positions))


class BlankParser:
    """Each blank's token ids from the model's output as it arrives. Never raises, whatever the output.

    Sentinel k opens blank k when it lies past every blank seen so far, completing the blanks before it
    (those it skipped stay empty); a sentinel that repeats or goes back completes the open blank, and
    the tokens after it are dropped until a sentinel further on. An end token, or a sentinel past the
    last blank, completes them all. Tokens before the first sentinel are dropped. Without sentinels
    (fill-in-the-middle) blank 0 is open from the start. Blanks complete in index order, each once.
    """

    def __init__(self, num_blanks: int, sentinels: Mapping[int, int], end_ids: Collection[int]) -> None:
        self.ids: list[list[int]] = [[] for _ in range(num_blanks)]
        self.num_done = 0  # blanks [0, num_done) are complete
        self.open: int | None = None if sentinels else 0  # the blank being written, always num_done if any
        self._sentinels = sentinels
        self._end_ids = end_ids

    def feed(self, token_id: int) -> range:
        """Take one output token; returns the blanks it completes."""
        k = self._sentinels.get(token_id)
        if token_id in self._end_ids or (k is not None and k >= len(self.ids)):
            return self.finish()
        if k is None:
            if self.open is not None:
                self.ids[self.open].append(token_id)
            return range(0)
        if k > (self.num_done - 1 if self.open is None else self.open):
            done = self._complete(k)
            self.open = k
            return done
        done = range(0) if self.open is None else self._complete(self.open + 1)
        self.open = None
        return done

    def finish(self) -> range:
        """The output ended: completes every blank not yet complete."""
        self.open = None
        return self._complete(len(self.ids))

    def _complete(self, end: int) -> range:
        done = range(self.num_done, max(end, self.num_done))
        self.num_done = done.stop
        return done


@dataclass(frozen=True)
class SentinelFormat:
    """Span corruption (T5, CPM-2): blank i is sentinel i in the encoder's input; the decoder writes each
    blank after its sentinel and ends with the sentinel after the last blank, or EOS."""

    sentinel_ids: tuple[int, ...]  # the id of sentinel i
    eos_ids: frozenset[int]
    continue_id: int  # the blank a plain prompt is continued by: T5's first sentinel, CPM-2's last (as BMInf)

    why = ""  # what bounds max_blanks, for BlankCountError's message

    @property
    def max_blanks(self) -> int:
        return min(MAX_BLANKS, len(self.sentinel_ids))

    def prompt_ids(self, pieces: list[list[int]], head: list[int], tail: list[int]) -> list[int]:
        ids = [*head, *pieces[0]]
        for sentinel, piece in zip(self.sentinel_ids, pieces[1:], strict=False):
            ids += [sentinel, *piece]
        return ids + tail

    def stop_ids(self, num_blanks: int) -> tuple[int, ...]:
        return self.sentinel_ids[num_blanks:]

    def parser(self, num_blanks: int) -> BlankParser:
        return BlankParser(num_blanks, {t: i for i, t in enumerate(self.sentinel_ids)}, self.eos_ids)


@dataclass(frozen=True)
class FimFormat:
    """Fill-in-the-middle, prefix-suffix-middle order: one blank, which the model writes after the middle
    token and ends with one of `end_ids` or EOS."""

    prefix_id: int
    suffix_id: int
    middle_id: int
    end_ids: tuple[int, ...]
    eos_ids: frozenset[int]

    max_blanks = 1
    why = " for a fill-in-the-middle model"

    def prompt_ids(self, pieces: list[list[int]], head: list[int], tail: list[int]) -> list[int]:
        # The tokenizer's tail (an EOS) would end the text before the middle is written: left out.
        return [*head, self.prefix_id, *pieces[0], self.suffix_id, *pieces[1], self.middle_id]

    def stop_ids(self, num_blanks: int) -> tuple[int, ...]:
        return self.end_ids

    def parser(self, num_blanks: int) -> BlankParser:
        return BlankParser(num_blanks, {}, {*self.end_ids, *self.eos_ids})


FillFormat = SentinelFormat | FimFormat


def fill_format(config: ModelConfig, tokenizer: Tokenizer, eos_ids: Collection[int] = ()) -> FillFormat:
    """How this model fills blanks, found in its config and vocabulary; UnsupportedTaskError if it cannot."""

    def known(token: str) -> int | None:  # an id the model has an embedding for
        i = tokenizer.token_to_id(token)
        return i if i is not None and i < config.vocab_size else None

    eos = frozenset(eos_ids)
    if config.is_encoder_decoder:
        for style in SENTINEL_STYLES:
            found = (known(style.format(k)) for k in itertools.count())
            ids = tuple(itertools.takewhile(lambda i: i is not None, found))
            if ids:
                return SentinelFormat(ids, eos, ids[-1] if style == "<s_{}>" else ids[0])
        raise UnsupportedTaskError(
            f"the model ({config.model_type}) is encoder-decoder but its vocabulary has no sentinel tokens "
            f"({' or '.join(s.format(0) for s in SENTINEL_STYLES)}), so it cannot fill blanks; use /generate")
    for prefix, suffix, middle, ends in FIM_STYLES:
        special = [known(t) for t in (prefix, suffix, middle)]
        if None not in special:
            end_ids = tuple(i for i in map(known, ends) if i is not None)
            return FimFormat(*special, end_ids, eos)
    raise UnsupportedTaskError(
        f"the model ({config.model_type}) is decoder-only without fill-in-the-middle tokens, so it cannot fill "
        "blanks; serve an encoder-decoder (T5, CPM-2) or a FIM model (StarCoder, Qwen2.5-Coder, CodeLlama) for "
        "/fill_blank, or use /generate")


@dataclass(frozen=True)
class Continuation:
    """How an encoder-decoder trained on span corruption continues a plain prompt (BMInf's CPM-2 `generate`):
    the prompt gets one blank at its end, which the decoder writes after that blank's sentinel and ends at
    the next sentinel or EOS. A prompt that already holds sentinels is span corruption input and is left
    as it is."""

    sentinel_id: int
    sentinel_ids: frozenset[int]
    tail: tuple[int, ...]  # what the tokenizer ends any text with (T5: EOS), kept after the blank

    def applies(self, encoder_ids: Sequence[int]) -> bool:
        return not self.sentinel_ids.intersection(encoder_ids)

    def encoder_ids(self, prompt_ids: Sequence[int]) -> list[int]:
        """The prompt with the blank before the tokenizer's tail (added when the prompt lacks it)."""
        ids = list(prompt_ids)
        if self.tail and ids[-len(self.tail) :] == list(self.tail):
            ids = ids[: -len(self.tail)]
        return [*ids, self.sentinel_id, *self.tail]


def continuation(config: ModelConfig, tokenizer: Tokenizer) -> Continuation | None:
    """The model's way to continue a plain prompt, if it is an encoder-decoder with sentinels."""
    try:
        fmt = fill_format(config, tokenizer)
    except UnsupportedTaskError:
        return None
    if not isinstance(fmt, SentinelFormat):
        return None
    return Continuation(fmt.continue_id, frozenset(fmt.sentinel_ids), tuple(_frame(tokenizer)[1]))


def infill_ids(fmt: FillFormat, tokenizer: Tokenizer, prefix: str, suffix: str, *, parse_special: bool = False
               ) -> tuple[list[int], tuple[int, ...]]:
    """The input that asks for the text between `prefix` and `suffix`, and the tokens that end it: one blank,
    whatever the two hold (a `<span>` in code stays code, unlike in `FillRequest`'s prompts)."""
    pieces = [tokenizer.encode(p, add_special_tokens=False, parse_special=parse_special) for p in (prefix, suffix)]
    return fmt.prompt_ids(pieces, *_frame(tokenizer)), fmt.stop_ids(1)


def _frame(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after any text of its own accord (LLaMA: BOS; T5: EOS after)."""
    plain = tokenizer.encode(_PROBE, add_special_tokens=False)
    full = tokenizer.encode(_PROBE)
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to its first stop string, as a streamed generation would have been cut."""
    head, stopped = StopMatcher(stop).feed(text)
    return head if stopped else text


class FillRequest:
    """One prompt's blanks: the model input that asks for them, then their texts as the output arrives.

    Feed each generated token id to `feed` and call `finish` at the end; each returns the blanks it
    completed, so a server can stream every blank as soon as it is known.
    """

    def __init__(self, fmt: FillFormat, tokenizer: Tokenizer, prompt: str, *, parse_special: bool = False) -> None:
        """BlankCountError if the prompt's blanks are more than the format fills (or none)."""
        self.template = split_blanks(prompt, fmt.max_blanks, fmt.why)
        pieces = [tokenizer.encode(p, add_special_tokens=False, parse_special=parse_special)
                  for p in self.template.pieces]
        self.prompt_ids = fmt.prompt_ids(pieces, *_frame(tokenizer))
        num_blanks = len(self.template.positions)
        self.stop_token_ids = fmt.stop_ids(num_blanks)
        self._parser = fmt.parser(num_blanks)
        self._decode = tokenizer.decode
        self._texts = [""] * num_blanks

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """`params` with this request's end tokens added to its stop tokens."""
        return replace(params, stop_token_ids=(*params.stop_token_ids, *self.stop_token_ids))

    def feed(self, token_id: int) -> list[Blank]:
        """Take one generated token; returns the blanks it completes."""
        return self._blanks(self._parser.feed(token_id))

    def finish(self, stop: Sequence[str] = ()) -> list[Blank]:
        """Generation ended: returns the blanks not yet complete. The blank being written when a stop string
        ended generation is cut before it."""
        cut = self._parser.open
        return self._blanks(self._parser.finish(), stop, cut)

    @property
    def blanks(self) -> list[Blank]:
        """The blanks completed so far, in index order."""
        return [Blank(i, self.template.positions[i], self._texts[i]) for i in range(self._parser.num_done)]

    @property
    def text(self) -> str:
        """The prompt with each blank filled (blanks not yet complete are empty)."""
        return self.template.fill(self._texts)

    def _blanks(self, done: range, stop: Sequence[str] = (), cut: int | None = None) -> list[Blank]:
        for i in done:
            text = self._decode(self._parser.ids[i])
            self._texts[i] = _cut_at_stop(text, stop) if i == cut and stop else text
        return [Blank(i, self.template.positions[i], self._texts[i]) for i in done]


@dataclass(frozen=True)
class FillResult:
    """A finished fill: every blank, the prompt filled, why generation ended and the token counts."""

    blanks: list[Blank]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


def fill_blank(engine: Engine, prompt: str, params: SamplingParams | None = None, **kwargs: Any) -> FillResult:
    """Fill the `<span>` blanks of `prompt`, blocking; keyword arguments are SamplingParams fields.

    `max_tokens` bounds the output of all blanks together. Raises UnsupportedTaskError or BlankCountError.
    """
    fill = FillRequest(fill_format(engine.config, engine.tokenizer, engine.eos_ids), engine.tokenizer, prompt)
    params = fill.sampling(params or engine.sampling_params(**kwargs))
    reason, count = FinishReason.CANCELLED, 0
    for out in engine.stream(fill.prompt_ids, params):
        if out.token_id is not None:
            fill.feed(out.token_id)
            count += 1
        reason = out.finish_reason or reason
    fill.finish(params.stop)
    return FillResult(fill.blanks, fill.text, reason, len(fill.prompt_ids), count)
