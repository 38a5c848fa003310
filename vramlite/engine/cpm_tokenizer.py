"""CPM-Ant / CPM-2 tokenization: jieba word segmentation, then greedy longest-match WordPiece over `vocab.txt`.

Ids equal transformers' `CpmAntTokenizer`: jieba's precise mode without its HMM for unknown words (as
transformers 5 runs it through rjieba), every word then split left to right into the longest vocabulary
entries, with `<unk>` for a character no entry starts with (and for a word over 200 characters). No
"##" continuation marks: word pieces are plain vocabulary entries. `vocab.txt` holds one token a line,
the line number being its id; its `</_>` and `</n>` entries stand for " " and "\\n". With
`add_special_tokens` the ids start with `<s>`.

Decoding concatenates the tokens' text. Special tokens (`<s>`, `</s>`, `<unk>`, `<pad>`, `<d>`, `</d>`)
are skipped by default; with `skip_special_tokens=False` they are all shown, where transformers still
drops `<s>`, `</s>` and `<pad>`.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jieba
import tokenizers
from tokenizers import AddedToken, decoders, models

from vramlite.engine.errors import ModelLoadError
from vramlite.engine.tokenizer import Tokenizer, _bos_eos_ids, _chat_template, _content

# CpmAntTokenizer's defaults, each overridable by the same key in tokenizer_config.json.
_DEFAULT_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "bod_token": "<d>", "eod_token": "</d>"}
_SPACE, _LINE = "</_>", "</n>"
_MAX_WORD_CHARS = 200

jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary loading at DEBUG on its own stderr handler


@functools.cache
def _segmenter() -> jieba.Tokenizer:
    """One jieba segmenter (its dictionary takes ~60 MB) for every CPM tokenizer, loaded on first use."""
    segmenter = jieba.Tokenizer()
    segmenter.initialize()
    return segmenter


class CpmTokenizer(Tokenizer):
    """A `Tokenizer` for a CPM `vocab.txt`; `Tokenizer.from_dir` builds it for such a directory.

    `backend` is a word-level model of the vocabulary (with " " and "\\n" for `</_>` and `</n>`) whose
    special tokens are marked; it maps ids to text, the encoding is done here.
    """

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None, eos_ids: Sequence[int],
                 chat_template: str | None = None) -> None:
        super().__init__(backend, bos_id, eos_ids, chat_template)
        self._vocab = backend.get_vocab(with_added_tokens=True)
        self._unk_id = self._vocab[backend.model.unk_token]
        self._longest = max(map(len, self._vocab))
        specials = sorted((backend.id_to_token(i) for i in self.special_ids), key=len, reverse=True)
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        self._jieba = _segmenter()

    @classmethod
    def from_vocab(cls, path: Path, config: dict[str, Any]) -> CpmTokenizer:
        """Load `path/vocab.txt` with tokenizer_config.json's (`config`) token names and the model's EOS ids."""
        file = path / "vocab.txt"
        try:
            lines = file.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{file} is not a readable vocabulary: {e}") from None
        if lines[-1] == "":
            lines.pop()
        # As CpmAntTokenizer's load_vocab: a token listed twice keeps its last line's id.
        vocab = {token: i for i, token in enumerate(lines)}
        names = {key: _content(config.get(key)) or default for key, default in _DEFAULT_TOKENS.items()}
        for marker, text in ((config.get("space_token") or _SPACE, " "), (config.get("line_token") or _LINE, "\n")):
            if marker not in vocab:
                raise ModelLoadError(f"{file} has no {marker!r} entry (the token for {text!r})")
            vocab[text] = vocab.pop(marker)
        if names["unk_token"] not in vocab:
            raise ModelLoadError(f"{file} has no unknown token {names['unk_token']!r}")
        backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=names["unk_token"]))
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in dict.fromkeys(names.values()) if t in vocab])
        return cls(backend, *_bos_eos_ids(path, backend, names["bos_token"], names["eos_token"]),
                   _chat_template(path, config))

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, after `<s>` when `add_special_tokens`.

        Special-token strings in `text` stay plain text unless `parse_special` (trusted text only).
        """
        ids = [self.bos_id] if add_special_tokens and self.bos_id is not None else []
        for i, part in enumerate(self._special_split.split(text) if parse_special else [text]):
            if i % 2:
                ids.append(self._vocab[part])
            else:
                for word in self._jieba.cut(part, cut_all=False, HMM=False):
                    ids += self._word_ids(word)
        return ids

    def _word_ids(self, word: str) -> list[int]:
        """WordPiece of one jieba word: the longest vocabulary entry at each position, else `<unk>` for a char."""
        if len(word) > _MAX_WORD_CHARS:
            return [self._unk_id]
        ids, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self._longest), start, -1):
                if (token_id := self._vocab.get(word[start:end])) is not None:
                    ids.append(token_id)
                    start = end
                    break
            else:
                ids.append(self._unk_id)
                start += 1
        return ids
