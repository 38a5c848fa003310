"""Demo models shipped with the package, so the daemon runs with no download."""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).parent
DEFAULT = "demo-llama"
FILL_BLANK = "demo-t5"  # the encoder-decoder that answers /fill_blank when no model is named


def path(name: str = DEFAULT) -> Path:
    """Directory of the shipped demo model `name`."""
    return DIR / name
