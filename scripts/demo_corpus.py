"""The demo models' corpus: Debian's `fortunes` and `fortunes-zh`, and its fixed held-out split."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def read_corpus(root: Path) -> list[str]:
    """All fortunes as documents, ANSI colour codes stripped."""
    docs: list[str] = []
    for path in sorted(root.iterdir()):
        if path.suffix in {".dat", ".u8"} or not path.is_file() or path.is_symlink():
            continue
        text = ANSI.sub("", path.read_text(encoding="utf-8", errors="replace"))
        for doc in re.split(r"^%\s*$", text, flags=re.M):
            doc = doc.strip("\n")
            if doc.strip():
                docs.append(doc)
    return docs


def is_heldout(doc: str) -> bool:
    """A stable 2% slice, chosen by content hash, that training never sees."""
    return hashlib.sha256(doc.encode()).digest()[0] < 6
