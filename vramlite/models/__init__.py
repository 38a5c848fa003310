"""Demo models shipped with the package, so the daemon runs with no download."""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).parent
DEFAULT = "demo-llama"


def path(name: str = DEFAULT) -> Path:
    """Directory of the shipped demo model `name`."""
    return DIR / name
