"""Text ↔ token ids for a local HF-format model directory.

Both formats end up as one `tokenizers.Tokenizer`: `tokenizer.json` is loaded as written, and a
sentencepiece `tokenizer.model` is converted the way transformers 5 builds `LlamaTokenizer` from it
(BPE with byte fallback, `Metaspace` pre-tokenizer, control pieces as special tokens, user-defined
pieces as plain added tokens). Converting rather than calling sentencepiece keeps ids identical to
`AutoTokenizer.from_pretrained(dir)` in the corners where the two differ:

- text starting with a space: sentencepiece adds its dummy prefix anyway (" Hi" → "▁▁Hi"), transformers
  does not (" Hi" → "▁Hi"), so " Hi" decodes back to "Hi";
- text starting with a user-defined piece such as "\\n": sentencepiece gives "▁", "\\n", transformers
  gives "\\n" alone.

(transformers 5 rebuilds a `tokenizer.json` of a known class such as LlamaTokenizer from the class's own
pipeline; it is loaded here as written, which is what its authors serialized.)

Special-token strings inside text ("</s>", "<|endoftext|>", ...) are encoded as ordinary text by
default, so a user cannot inject control tokens through a prompt; pass `parse_special=True` only for
trusted text such as a rendered chat template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from vramlite.engine.config import eos_ids as parse_eos_ids
from vramlite.engine.config import read_json
from vramlite.engine.errors import ModelLoadError

# sentencepiece_model.proto: ModelProto.SentencePiece.Type and TrainerSpec.ModelType values.
_SP_CONTROL, _SP_USER_DEFINED = 3, 4
_SP_BPE = 2

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte-fallback tokens


class Tokenizer:
    """Encoder/decoder for one model, plus its BOS/EOS ids and chat template. Build with `from_dir`."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None, eos_ids: Sequence[int],
                 chat_template: str | None = None) -> None:
        self._backend = backend
        self._backend.encode_special_tokens = True
        self._bos_id = bos_id
        self._eos_ids = tuple(dict.fromkeys(eos_ids))
        self.chat_template = chat_template
        self._special_ids = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` (preferred) or `tokenizer.model` with the directory's JSON configs; a CPM
        `vocab.txt` (tokenizer_class CpmAntTokenizer, or the only tokenizer file) loads as a `CpmTokenizer`.

        Raises ModelLoadError naming the file when the tokenizer is missing or unreadable.
        """
        path = Path(path)
        if not path.is_dir():
            raise ModelLoadError(f"model directory {path} does not exist")
        config = _optional_json(path / "tokenizer_config.json")
        if _is_cpm(path, config):
            from vramlite.engine.cpm_tokenizer import CpmTokenizer  # a subclass of this one

            return CpmTokenizer.from_vocab(path, config)
        sentencepiece = not (path / "tokenizer.json").is_file()
        if not sentencepiece:
            backend = _load_tokenizer_json(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            backend = _load_sentencepiece(path / "tokenizer.model", config)
            config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", **config}  # LLaMA's
        else:
            raise ModelLoadError(f"no tokenizer.json or tokenizer.model in {path}")

        _add_config_tokens(backend, config, path / "tokenizer_config.json")
        bos, eos = _content(config.get("bos_token")), _content(config.get("eos_token"))
        if sentencepiece:
            # LLaMA convention: BOS unless told otherwise. (transformers 5 defaults add_bos_token to False
            # when tokenizer_config.json omits it, but LLaMA checkpoints all state it.) A tokenizer.json
            # brings its own post-processor, and transformers 5 ignores add_bos_token for it too.
            _set_bos_eos_template(backend, bos if config.get("add_bos_token", True) else None,
                                  eos if config.get("add_eos_token", False) else None)

        return cls(backend, *_bos_eos_ids(path, backend, bos, eos), _chat_template(path, config))

    def encode(self, text: str, add_special_tokens: bool = True, *, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS as the model's post-processor says.

        Special-token strings in `text` stay plain text unless `parse_special` (trusted text only).
        """
        backend = self._parsing_backend if parse_special else self._backend
        return backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; incomplete UTF-8 byte sequences come out as U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (e.g. "<s>", "▁the"), or None."""
        return self._backend.token_to_id(token)

    def sentinel_id(self, index: int) -> int | None:
        """Id of the `index`-th fill-in-the-blank sentinel: T5's `<extra_id_N>` or CPM-2's `<s_N>`; else None."""
        for name in (f"<extra_id_{index}>", f"<s_{index}>"):
            if (token_id := self._backend.token_to_id(name)) is not None:
                return token_id
        return None

    @property
    def bos_id(self) -> int | None:
        """The BOS id (tokenizer_config.json's bos_token, else config.json's bos_token_id), or None."""
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: tokenizer, config.json and generation_config.json EOS."""
        return self._eos_ids

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of special (control) tokens: skipped by `decode` by default."""
        return self._special_ids

    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id writes into generated text (None for special tokens), read from the decoder: GPT-2's
        byte-level alphabet, sentencepiece's `▁` for a space and `<0xNN>` byte tokens, string replacements.
        (The decoder's strip of the text's first space is left out: a token's bytes are the same anywhere.)"""
        decoder = json.loads(self._backend.to_str()).get("decoder") or {}
        steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else [decoder]
        kinds = {step.get("type") for step in steps}
        unknown = kinds - {"ByteLevel", "ByteFallback", "Replace", "Metaspace", "Fuse", "Strip", None}
        if unknown:
            raise ValueError(f"the tokenizer's {', '.join(sorted(unknown))} decoder is not supported")
        replacements = [(step["pattern"]["String"], step["content"]) for step in steps
                        if step.get("type") == "Replace" and "String" in step.get("pattern", {})]
        replacements += [(step.get("replacement", "▁"), " ") for step in steps if step.get("type") == "Metaspace"]
        alphabet = {char: byte for byte, char in enumerate(_byte_alphabet())} if "ByteLevel" in kinds else {}
        out: list[bytes | None] = [None] * self.vocab_size
        for token, i in self._backend.get_vocab(with_added_tokens=True).items():
            if i in self._special_ids:
                continue
            if alphabet and all(c in alphabet for c in token):
                out[i] = bytes(alphabet[c] for c in token)
            elif "ByteFallback" in kinds and (byte := _BYTE_TOKEN.fullmatch(token)):
                out[i] = bytes([int(byte[1], 16)])
            else:
                for old, new in replacements:
                    token = token.replace(old, new)
                out[i] = token.encode()
        return out

    @cached_property
    def _parsing_backend(self) -> tokenizers.Tokenizer:
        # A copy, not a toggle of `encode_special_tokens`, so concurrent encodes never see the wrong mode.
        backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
        backend.encode_special_tokens = False
        return backend


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte 0..255 in its tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _is_cpm(path: Path, config: dict[str, Any]) -> bool:
    """Whether the directory holds a CPM-Ant / CPM-2 jieba + WordPiece `vocab.txt` tokenizer."""
    name = config.get("tokenizer_class")
    if name is not None:
        return name == "CpmAntTokenizer"
    return (path / "vocab.txt").is_file() and not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))


def _bos_eos_ids(path: Path, backend: tokenizers.Tokenizer, bos: str | None,
                 eos: str | None) -> tuple[int | None, list[int]]:
    """BOS id (the token, else config.json's) and every EOS id: the token's, config.json's, generation_config's."""
    model_config = _optional_json(path / "config.json")
    generation = _optional_json(path / "generation_config.json")
    bos_id = backend.token_to_id(bos) if bos else None
    if bos_id is None:
        bos_id = model_config.get("bos_token_id")
        if bos_id is not None and not isinstance(bos_id, int):
            raise ModelLoadError(f"{path / 'config.json'}: bos_token_id {bos_id!r} is not an integer")
    eos_id = backend.token_to_id(eos) if eos else None
    return bos_id, [
        *(() if eos_id is None else (eos_id,)),
        *parse_eos_ids(model_config.get("eos_token_id")),
        *parse_eos_ids(generation.get("eos_token_id")),
    ]


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def _content(token: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string, a dict with "content", or null."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def _load_tokenizer_json(file: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises plain Exception for any malformed file
        raise ModelLoadError(f"{file} is not a HF tokenizers file: {e}") from None


def _add_config_tokens(backend: tokenizers.Tokenizer, config: dict[str, Any], source: Path) -> None:
    """Apply tokenizer_config.json's added and special tokens to the backend, as transformers does.

    `added_tokens_decoder` entries missing from the backend are added and must land on their declared
    ids; bos/eos/unk/pad and additional special tokens found in the vocabulary are marked special.
    Named tokens the vocabulary lacks are ignored: the model has no embedding for them.
    """
    added = backend.get_added_tokens_decoder()
    for key, spec in (config.get("added_tokens_decoder") or {}).items():
        content = _content(spec)
        if content is None or not str(key).isdigit():
            raise ModelLoadError(f"{source}: added_tokens_decoder entry {key!r} needs an id and a content")
        special = bool(spec.get("special", False))
        known = added.get(int(key))
        if known is not None and known.content == content and known.special == special:
            continue
        flags = {k: bool(spec[k]) for k in ("single_word", "lstrip", "rstrip", "normalized") if k in spec}
        backend.add_tokens([AddedToken(content, special=special, **flags)])
        if backend.token_to_id(content) != int(key):
            raise ModelLoadError(
                f"{source}: added token {content!r} is declared as id {key} but the tokenizer "
                f"gives it id {backend.token_to_id(content)}"
            )
    extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
    if isinstance(extra, dict):
        extra = list(extra.values())
    names = [config.get(k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    for content in map(_content, [*names, *extra]):
        if content is not None and backend.token_to_id(content) is not None:
            backend.add_special_tokens([AddedToken(content, special=True, normalized=False)])


def _chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """`chat_template.jinja` if present (as transformers prefers), else tokenizer_config's template."""
    file = path / "chat_template.jinja"
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _set_bos_eos_template(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    parts = [*([bos] if bos else []), "$A", *([eos] if eos else [])]
    specials = [(t, backend.token_to_id(t)) for t in parts if t != "$A"]
    missing = [t for t, i in specials if i is None]
    if missing:
        raise ModelLoadError(f"tokenizer.model has no piece for {', '.join(missing)}")
    backend.post_processor = processors.TemplateProcessing(single=parts, special_tokens=specials)


def _load_sentencepiece(file: Path, config: dict[str, Any]) -> tokenizers.Tokenizer:
    """A sentencepiece BPE model as transformers' LlamaTokenizer converts it."""
    try:
        pieces, model_type = _read_sentencepiece(file.read_bytes())
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} is not a sentencepiece model: {e}") from None
    if not pieces:
        raise ModelLoadError(f"{file} is not a sentencepiece model: it has no pieces")
    if model_type != _SP_BPE:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(model_type, str(model_type))
        raise ModelLoadError(f"{file} is a {kind} sentencepiece model; only BPE (LLaMA-style) is supported")
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=_merges(vocab), fuse_unk=True, byte_fallback=True)
    )
    add_prefix_space = bool(config.get("add_prefix_space", True))
    if not add_prefix_space:
        scheme = "never"
    elif config.get("legacy", False):
        scheme = "always"  # legacy=True also prefixes the text after every added token
    else:
        scheme = "first"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_tokens([
        AddedToken(piece, special=kind == _SP_CONTROL, normalized=False)
        for piece, kind in pieces if kind in (_SP_CONTROL, _SP_USER_DEFINED)
    ])
    return backend


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary, ordered as transformers' `generate_merges` does.

    Every split of a piece into two vocabulary pieces is a merge, ranked by the piece's id (a
    sentencepiece BPE piece's score falls with its id), then by the left part's length.
    """
    merges = []
    for piece, rank in vocab.items():
        splits = ((piece[:k], piece[k:]) for k in range(1, len(piece)))
        local = [(left, right) for left, right in splits if left in vocab and right in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend((rank, left, right) for left, right in local)
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])))
    return [(left, right) for _, left, right in merges]


def _read_sentencepiece(data: bytes) -> tuple[list[tuple[str, int]], int]:
    """(piece, type) for each vocabulary entry and the model type, from a serialized ModelProto.

    Reading the protobuf wire format directly spares a protobuf dependency; only three fields matter:
    ModelProto.pieces (1) with SentencePiece.piece (1) and .type (3, default NORMAL = 1), and
    ModelProto.trainer_spec (2) with TrainerSpec.model_type (3, default UNIGRAM = 1).
    """
    pieces = []
    model_type = 1
    for field, value in _proto_fields(data):
        if field == 1 and isinstance(value, bytes):
            piece, kind = None, 1
            for f, v in _proto_fields(value):
                if f == 1 and isinstance(v, bytes):
                    piece = v.decode("utf-8")
                elif f == 3 and isinstance(v, int):
                    kind = v
            if piece is None:
                raise ValueError(f"vocabulary entry {len(pieces)} has no piece")
            pieces.append((piece, kind))
        elif field == 2 and isinstance(value, bytes):
            for f, v in _proto_fields(value):
                if f == 3 and isinstance(v, int):
                    model_type = v
    return pieces, model_type


def _proto_fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire in (1, 2, 5):
            if wire == 2:
                size, pos = _varint(data, pos)
            else:
                size = 8 if wire == 1 else 4
            if pos + size > len(data):
                raise ValueError("truncated protobuf message")
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
