"""One choice's text, made from its tokens where the stream is consumed, with its stop strings.

Text is decoded incrementally (whole UTF-8 characters only; the decoder's tail is flushed at the
end, so a request that ends inside a character keeps it, as U+FFFD). While stop strings may still
match, the last `max(len(stop)) - 1` characters are held back, so streamed text never shows a stop
string's prefix that is later cut, and nothing past a stop string is ever released.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # mistral-common: imported only where a tokenizer exists
    from cluster.model.tokenizer import Tokenizer


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...], include_stop: bool = False) -> None:
        self._decoder = None
        if tokenizer is not None:
            from cluster.model.tokenizer import IncrementalDecoder

            self._decoder = IncrementalDecoder(tokenizer)
        self._stop = stop
        self._include_stop = include_stop  # the text ends after the stop string rather than before it
        self._hold = max(len(s) for s in stop) - 1 if stop else 0
        self.text = ""  # everything decoded so far, cut at a stop string
        self.stop_string: str | None = None  # the stop string that ended the text
        self.done = False
        self._released = 0

    @property
    def num_released(self) -> int:
        return self._released

    def push(self, token: int, check_stop: bool = True) -> bool:
        """Adds one token's text; True when it completed a stop string (the text is cut before it)."""
        if self._decoder is None or self.done:
            return False
        return self._add(self._decoder.push(token), check_stop)

    def finish(self, check_stop: bool = True) -> bool:
        """End of stream: the decoder's tail is added and nothing is held back any more; True when
        the tail completed a stop string."""
        if self.done:
            return False
        stopped = self._decoder is not None and self._add(self._decoder.flush(), check_stop)
        self.done = True
        return stopped

    def release(self) -> str:
        """Text not released before that can be shown now."""
        end = len(self.text)
        if not self.done and self._hold:
            end = max(end - self._hold, self._released)
        piece, self._released = self.text[self._released:end], end
        return piece

    def _add(self, piece: str, check_stop: bool) -> bool:
        before = len(self.text)
        self.text += piece
        if not (piece and check_stop and self._stop):
            return False
        # A new match must end in the new text, so it starts at most len(stop) - 1 before it (an
        # older one was not looked for: min_tokens held stop strings back then).
        hits = [(at, s) for s in self._stop if (at := self.text.find(s, max(0, before - len(s) + 1))) >= 0]
        if not hits:
            return False
        at, self.stop_string = min(hits)
        # Never cut before `_released`: the held-back tail covers any match.
        self.text = self.text[:at + len(self.stop_string)] if self._include_stop else self.text[:at]
        self.done = True
        return True
