"""Stop sequences: a text ends before the first of them; while it grows, only the part that cannot turn into
one is safe to send (a stream must never show the start of a stop sequence that the next token completes)."""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what a tokenizer decodes half of a multi-byte character to


def find_stop(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop sequence starts in `text`, or None."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(cuts) if cuts else None


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many trailing characters of `text` might be the start of a stop sequence (or half a character)."""
    hold = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    n = len(text) - len(text.rstrip(REPLACEMENT))  # an incomplete UTF-8 character: wait for its other bytes
    return max(hold, n)


class TextStream:
    """A sequence's text as its tokens arrive: `push(text_so_far)` returns the new safe part, `finish` the rest.

    `text_so_far` is the decoding of all new tokens (decoding them together, not one by one, keeps the spaces
    and multi-byte characters a tokenizer merges across tokens)."""

    def __init__(self, stop: Sequence[str]):
        self.stop, self.sent, self.stopped = tuple(stop), 0, False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        cut = find_stop(text, self.stop)
        if cut is not None:
            self.stopped = True
            return self._take(text[:cut])
        return self._take(text[: len(text) - held_back(text, self.stop)])

    def finish(self, text: str) -> str:
        """The rest of the text once the sequence is over (cut at a stop sequence)."""
        if self.stopped:
            return ""
        cut = find_stop(text, self.stop)
        self.stopped = True
        return self._take(text if cut is None else text[:cut])

    def _take(self, upto: str) -> str:
        delta = upto[self.sent :] if len(upto) > self.sent else ""
        self.sent = max(self.sent, len(upto))
        return delta
