"""Token ids in, text out: what a request has produced so far as text, stop strings honoured
exactly, and what a stream may send now without ever taking it back."""

from __future__ import annotations


class TextStream:
    """The text of one request's output tokens.

    ``add(tokens)`` appends one step's tokens; the text is always the tokenizer's decoding of the
    whole output so far (so the final text equals ``tokenizer.decode(output)``), cut just before
    the first occurrence of a stop string. When a stop string appears, ``stopped`` becomes true and
    ``num_tokens`` is the number of tokens it took to produce it (later tokens are dropped).
    ``pending()`` is the text not yet sent that is safe to send: it never ends in an unfinished
    UTF-8 character and never in a prefix of a stop string (that text could still become part of
    one, which must not be sent)."""

    def __init__(self, tokenizer, stop: list[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _first_stop(self, text: str, start: int) -> int:
        """Where the earliest stop string begins in ``text`` at or after ``start`` (-1: none)."""
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else -1

    def add(self, tokens: list[int]) -> bool:
        """Append tokens; True when a stop string ended the text (then call nothing more)."""
        if self.stopped or not tokens:
            return self.stopped
        before = len(self.ids)
        # a stop string can only begin in the last (longest stop - 1) characters of the text that
        # is final (an unfinished character at the end decodes as U+FFFD and may still change)
        stable = len(self.text.rstrip("\ufffd"))
        checked = max(0, stable - max((len(s) for s in self.stop), default=1) + 1)
        self.ids.extend(tokens)
        text = self._decode(self.ids)
        if self.stop and self._first_stop(text, checked) >= 0:
            # the fewest tokens that produce a stop string, so the count matches vanilla decoding
            for n in range(before + 1, len(self.ids) + 1):
                text = self._decode(self.ids[:n])
                at = self._first_stop(text, checked)
                if at >= 0:
                    del self.ids[n:]
                    self.text = text[:at]
                    self.stopped = True
                    return True
        self.text = text
        return False

    def _held(self) -> int:
        """How many characters at the end of the text must wait."""
        text = self.text
        held = 0
        while held < len(text) and text[len(text) - held - 1] == "\ufffd":
            held += 1  # an unfinished multi-byte character decodes as U+FFFD until it completes
        if self.stopped:
            return 0
        end = len(text) - held
        for s in self.stop:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text.endswith(s[:k], 0, end):
                    held = max(held, len(text) - end + k)
                    break
        return held

    def pending(self, final: bool = False) -> str:
        """Text that can be sent now (all of it when ``final``); marks it sent."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        if end <= self.sent:
            return ""
        chunk = self.text[self.sent:end]
        self.sent = end
        return chunk
