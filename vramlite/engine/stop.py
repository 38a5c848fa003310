"""Stop strings matched on streamed, decoded text across token boundaries."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Filters a stream of decoded text deltas, cutting it before the first stop string.

    The stream stops at the first character that completes any stop string and is cut where that
    stop string starts (the longest one if several end on that character), or with `keep` after it. This is
    what feeding one character at a time would give, so the result does not depend on how the text is chunked.
    Text that could still become the start of a stop string is held back until it cannot.
    """

    def __init__(self, stop: Sequence[str], keep: bool = False) -> None:
        if isinstance(stop, str):
            raise TypeError("stop must be a sequence of strings, not one string")
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.stop: tuple[str, ...] = tuple(stop)
        # Every proper prefix of a stop string: a held-back tail must be one of these.
        self._prefixes = {s[:n] for s in self.stop for n in range(1, len(s))}
        self._max_prefix = max((len(s) - 1 for s in self.stop), default=0)
        self._held = ""
        self.matched: str | None = None
        self.keep = keep

    @property
    def stopped(self) -> bool:
        """Whether a stop string has been hit."""
        return self.matched is not None

    def feed(self, text: str) -> tuple[str, bool]:
        """Take the next text delta; return the text safe to emit now and whether a stop string was hit."""
        if self.matched is not None:
            return "", True
        buf = self._held + text
        # Matches can only start in `buf`: emitted text never ends with a prefix of a stop string.
        best: tuple[int, int, str] | None = None  # (end, -length, stop string)
        for s in self.stop:
            start = buf.find(s)
            if start >= 0 and (best is None or (start + len(s), -len(s)) < best[:2]):
                best = (start + len(s), -len(s), s)
        if best is not None:
            end, neg_len, self.matched = best
            self._held = ""
            return buf[: end if self.keep else end + neg_len], True
        hold = next(
            (n for n in range(min(len(buf), self._max_prefix), 0, -1) if buf[-n:] in self._prefixes), 0
        )
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Return the held-back text at the end of the stream ("" once a stop string was hit)."""
        held, self._held = self._held, ""
        return held
