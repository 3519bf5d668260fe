"""Token ids in, text out: what a request has produced so far as text, stop strings honoured
exactly, and what a stream may send now without ever taking it back.

Detokenization is incremental: each new token costs the decoding of a few tokens, never of the
whole output. Fast tokenizers use the tokenizers library's ``DecodeStream`` (it holds a token back
while it ends in an unfinished UTF-8 character); others decode a short window of recent tokens and
keep what it adds (the way vLLM does)."""

from __future__ import annotations

from typing import Any

WINDOW = 6  # tokens of context before the first undecoded one (windowed decoding)


class _Window:
    """Incremental decoding with ``tokenizer.decode`` on a sliding window."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here
        self.read = 0  # tokens before this are decoded

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def step(self, token: int) -> str | None:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None  # nothing new yet, or an unfinished character
        self.prefix, self.read = max(self.prefix, len(self.ids) - WINDOW), len(self.ids)
        return after[len(before):]

    def tail(self) -> str:
        """What the tokens still held decode to (an unfinished character: U+FFFD, as decode)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        return self._decode(self.ids[self.prefix:])[len(before):]


class _Stream(_Window):
    """``DecodeStream`` of a fast tokenizer; the window's ``tail`` for tokens it still holds."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool) -> None:
        from tokenizers.decoders import DecodeStream

        super().__init__(tokenizer, skip_special_tokens)
        self.backend = tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token: int) -> str | None:
        self.ids.append(token)
        text = self.stream.step(self.backend, token)
        if text is not None:
            self.prefix, self.read = max(0, len(self.ids) - WINDOW), len(self.ids)
        return text


def incremental_decoder(tokenizer: Any, skip_special_tokens: bool = True) -> _Window:
    """``DecodeStream`` where it decodes as ``tokenizer.decode`` does, else the window."""
    if getattr(tokenizer, "backend_tokenizer", None) is not None and not getattr(
            tokenizer, "clean_up_tokenization_spaces", False):
        try:
            return _Stream(tokenizer, skip_special_tokens)
        except ImportError:  # tokenizers without DecodeStream
            pass
    return _Window(tokenizer, skip_special_tokens)


class TextStream:
    """The text of one request's output tokens.

    ``add(tokens)`` appends one step's tokens; the text is the tokenizer's decoding of the output
    so far (so the final text equals ``tokenizer.decode(output)``), cut just before the first
    occurrence of a stop string. When a stop string appears, ``stopped`` becomes true and
    ``num_tokens`` is the number of tokens it took to produce it (later tokens are dropped).
    ``pending()`` is the text not yet sent that is safe to send: it never holds an unfinished
    UTF-8 character and never ends in a prefix of a stop string (that text could still become part
    of one, which must not be sent)."""

    def __init__(self, tokenizer, stop: list[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self.decoder = incremental_decoder(tokenizer, skip_special_tokens)
        self.stop = [s for s in (stop or []) if s]
        self.longest = max((len(s) for s in self.stop), default=1)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self.closed = False

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def _first_stop(self, start: int) -> int:
        """Where the earliest stop string begins in the text at or after ``start`` (-1: none)."""
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else -1

    def add(self, tokens: list[int]) -> bool:
        """Append tokens; True when a stop string ended the text (then call nothing more)."""
        if self.stopped or self.closed:
            return self.stopped
        for token in tokens:  # token by token: the fewest tokens that show a stop string
            self.ids.append(token)
            piece = self.decoder.step(token)
            if not piece:
                continue
            start = max(0, len(self.text) - self.longest + 1)
            self.text += piece
            if self.stop:
                at = self._first_stop(start)
                if at >= 0:
                    self.text = self.text[:at]
                    self.stopped = True
                    return True
        return False

    def _held(self) -> int:
        """How many characters at the end of the text must wait (a possible stop prefix)."""
        if self.stopped:
            return 0
        text, held = self.text, 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    held = max(held, k)
                    break
        return held

    def pending(self, final: bool = False) -> str:
        """Text that can be sent now (all of it when ``final``); marks it sent."""
        if final and not self.stopped and not self.closed:
            self.closed = True  # tokens still held (an unfinished character) decode as they are
            tail = self.decoder.tail()
            at = -1
            if tail and self.stop:
                start = max(0, len(self.text) - self.longest + 1)
                self.text += tail
                at = self._first_stop(start)
                self.text = self.text if at < 0 else self.text[:at]
                self.stopped = at >= 0
            else:
                self.text += tail
        end = len(self.text) if final or self.stopped else len(self.text) - self._held()
        if end <= self.sent:
            return ""
        chunk = self.text[self.sent:end]
        self.sent = end
        return chunk
