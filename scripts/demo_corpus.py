"""The demo models' corpus: Debian's `fortunes` and `fortunes-zh`, and its fixed held-out split."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_sources(root: Path) -> dict[str, list[str]]:
    """The fortunes of each cookie file (by file name), ANSI colour codes stripped."""
    sources: dict[str, list[str]] = {}
    for path in sorted(root.iterdir()):
        if path.suffix in {".dat", ".u8"} or not path.is_file() or path.is_symlink():
            continue
        text = ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
        docs = [doc.strip("\n") for doc in re.split(r"^%\s*$", text, flags=re.M)]
        sources[path.name] = [doc for doc in docs if doc.strip()]
    return sources


def read_corpus(root: Path) -> list[str]:
    """All fortunes as documents, file by file."""
    return [doc for docs in read_sources(root).values() for doc in docs]


def is_heldout(doc: str) -> bool:
    """A stable 2% slice, chosen by content hash, that training never sees."""
    return hashlib.sha256(doc.encode()).digest()[0] < 6
