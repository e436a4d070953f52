"""Turning sampled token ids into streamed text: incremental detokenization and stop strings.

Decoding token by token is wrong for most tokenizers: a byte-level BPE token can be half of a UTF-8
character, and SentencePiece decides leading spaces from context. `IncrementalDecoder` decodes a small window
of recent ids and emits only the suffix that has become stable (the approach of TGI and vLLM), so the
concatenated deltas equal a full decode without re-decoding everything each step.
`StopMatcher` holds back text that could be the start of a stop string, so a stream never shows a stop
string (or part of one) that the final text then drops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"  # what decoders emit for a byte sequence that is not (yet) valid UTF-8


class IncrementalDecoder:
    """Feeds token ids one at a time and returns the newly decoded text."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window: gives the newest tokens their left context
        self._read = 0  # everything before this has been emitted

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_INCOMPLETE):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""  # nothing new yet (a special token) or a character still being completed

    def flush(self) -> str:
        """At the end: whatever is still held back, incomplete characters included."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopMatcher:
    """Accumulates the completion text, finds the first stop string and decides what is safe to emit."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(stop)
        self._longest = max((len(s) for s in self._stop), default=0)
        self._text = ""
        self._emitted = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The completion so far (after a stop: everything before the stop string)."""
        return self._text

    def feed(self, delta: str) -> str:
        """Add decoded text; return the part that can be streamed now. Sets `stopped` on a stop string."""
        if self.stopped or not delta:
            return ""
        if not self._stop:  # nothing to hold back
            self._text += delta
            return self._release(len(self._text))
        # A stop string not found before must end inside `delta`, so it starts at most `longest - 1` earlier.
        search_from = max(0, len(self._text) - self._longest + 1)
        self._text += delta
        hits = [i for i in (self._text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._text = self._text[: min(hits)]
            return self._release(len(self._text))
        return self._release(max(self._emitted, len(self._text) - self._held_back()))

    def finish(self) -> str:
        """The request ended for another reason: nothing can become a stop string any more."""
        return self._release(len(self._text))

    def _held_back(self) -> int:
        """Length of the longest suffix that is a proper prefix of some stop string."""
        for size in range(min(self._longest - 1, len(self._text)), 0, -1):
            tail = self._text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

    def _release(self, upto: int) -> str:
        out = self._text[self._emitted : upto]
        self._emitted = max(self._emitted, upto)
        return out
