"""Bounds on what a constraint may cost (docs/structured.md, "Compilation and errors"), and the
``{"choice": [...]}`` constraint.

- ``choice_regex``: vLLM's ``structured_outputs.choice`` (the output is exactly one of the given
  strings) as a regular expression, every character outside ``[A-Za-z0-9_ ]`` written as a
  ``\\x{HEX}`` escape, so no string can inject regex syntax; at most ``MAX_CHOICES`` strings of at
  most ``MAX_CHOICE_CHARS`` characters.
- ``parser_limits``: llguidance's resource limits for validating a grammar and for every matcher
  (its defaults, errors without grammar details); they bound the lexer and parser work of one
  mask. They do not bound everything: some schemas (e.g. an ``allOf`` of many patterns) make
  llguidance's validation itself take exponential time, which is why the server also compiles
  with a wall-clock bound (``server/constraints.py``).
"""

from __future__ import annotations

from typing import Any

from specdecode.types import SpecDecodeError

MAX_CHOICES = 256  # strings in one {"choice": [...]}
MAX_CHOICE_CHARS = 512  # characters in one of them
PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ")


def _literal(text: str) -> str:
    return "".join(c if c in PLAIN else f"\\x{{{ord(c):X}}}" for c in text)


def choice_regex(choices: Any) -> str:
    """A regex matching exactly one of ``choices`` (a non-empty list of strings)."""
    if not isinstance(choices, list) or not choices:
        raise SpecDecodeError("constraint choice must be a non-empty list of strings")
    if len(choices) > MAX_CHOICES:
        raise SpecDecodeError(f"constraint choice takes at most {MAX_CHOICES} strings "
                              f"(got {len(choices)})")
    for c in choices:
        if not isinstance(c, str):
            raise SpecDecodeError(f"constraint choice must hold strings only (got "
                                  f"{type(c).__name__})")
        if len(c) > MAX_CHOICE_CHARS:
            raise SpecDecodeError(f"constraint choice strings may have at most {MAX_CHOICE_CHARS} "
                                  f"characters (got {len(c)})")
    unique = list(dict.fromkeys(choices))
    return "(?:" + "|".join(_literal(c) for c in unique) + ")"


def parser_limits(llg: Any) -> Any:
    """The ``LLParserLimits`` every validation and matcher uses."""
    return llg.LLParserLimits(verbose_errors=False)
