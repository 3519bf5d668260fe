"""``sam``: SAM-Decoding, the "SAM only" drafter (Hu et al., "SAM Decoding: Speculative Decoding
via Suffix Automaton", 2024).

A suffix automaton over prompt + output (``suffix_automaton.SuffixAutomaton``) is extended with the
new tokens at every step (amortised O(1) per token). Its newest state's suffix link is the longest
suffix of the text that occurred earlier, with the first end position of that earlier occurrence;
the draft is the chain of tokens that followed it there, of length ``min(4 x match length,
num_draft_tokens)`` (the paper's SAM-only rule), further capped by the engine's depth and node caps.

Optionally a static automaton over a corpus of token ids (``corpus=PATH`` or ``corpus_tokens=[...]``)
is matched against the same text with matching statistics (follow the transition, else fall back
along suffix links; amortised O(1) per token). The draft then comes from whichever automaton has the
longer match; the dynamic one wins ties (the request's own text is the more local evidence; the
paper found a corpus written by another model can even hurt). The static automaton covers every
corpus position but the last, so each static match has at least one continuation token.

Corpus files: a ``.npy`` file holding a 1-D integer array, or any other file holding
whitespace-separated non-negative ints (documents may simply be concatenated, e.g. separated by the
EOS id). Automata are read-only once built and shared across the requests of one host through its
``CorpusCache`` (``build.host``, ``specdecode/host.py``) bounded to ``MAX_CACHED_CORPORA``
entries (least recently used out),
keyed by resolved path, size and modification time (``corpus``) or by content (``corpus_tokens``).
Building is pure Python: about 0.25 s and ~40 MB per 100k tokens of random text.

Options: ``num_draft_tokens`` (8) maximum chain length; ``min_match`` (1) shortest match that is
drafted from; ``corpus`` (None) path of a corpus file; ``corpus_tokens`` (None) the corpus as a list
(or 1-D numpy array) of ints, for the Python API and tests; at most one of the two.
Cost per step: O(new tokens + draft length), never O(context).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import DEPTH, count, owner_only
from specdecode.drafters.registry import register
from specdecode.drafters.suffix_automaton import SuffixAutomaton
from specdecode.types import Draft, SpecDecodeError, Verdict

MAX_CACHED_CORPORA = 4
DRAFT_PER_MATCHED_TOKEN = 4  # SAM only: draft min(4 x match length, num_draft_tokens) tokens


class StaticCorpus:
    """A corpus of token ids and the suffix automaton of all its tokens but the last (so that every
    match ends before the last position and has a continuation). Read-only once built."""

    __slots__ = ("tokens", "automaton", "max_token")

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens: tuple[int, ...] = tuple(tokens)
        self.automaton = SuffixAutomaton(self.tokens[:-1])
        self.max_token = max(self.tokens, default=-1)

    def __len__(self) -> int:
        return len(self.tokens)


def _token_list(values: Sequence[Any], what: str) -> list[int]:
    """Non-negative ints (Python or numpy) as a list; ``SpecDecodeError`` naming ``what`` if not."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise SpecDecodeError(f"{what} must hold non-negative token ids, found {v!r}")
        out.append(int(v))
    return out


def read_corpus(path: str | os.PathLike) -> list[int]:
    """Token ids of a corpus file: ``.npy`` (1-D integer array) or whitespace-separated ints."""
    name = os.fspath(path)
    try:
        if name.lower().endswith(".npy"):
            array = np.load(name, allow_pickle=False)
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
                raise SpecDecodeError(f"sam corpus {name!r} must hold a 1-D integer array, "
                                      f"got shape {array.shape} of {array.dtype}")
            tokens = array.tolist()
            if tokens and min(tokens) < 0:
                raise SpecDecodeError(f"sam corpus {name!r} holds negative token ids")
        else:
            with open(name, encoding="utf-8") as f:
                words = f.read().split()
            try:
                tokens = [int(w) for w in words]
            except ValueError as err:
                raise SpecDecodeError(f"sam corpus {name!r} must hold whitespace-separated ints "
                                      f"({err})") from None
            tokens = _token_list(tokens, f"sam corpus {name!r}")
    except SpecDecodeError:
        raise
    except (OSError, ValueError) as err:  # includes UnicodeDecodeError and bad .npy headers
        raise SpecDecodeError(f"sam corpus {name!r} cannot be read: {err}") from None
    if not tokens:
        raise SpecDecodeError(f"sam corpus {name!r} holds no tokens")
    return tokens


class CorpusCache:
    """Static automata shared across requests, at most ``max_entries`` (least recently used out).
    Thread-safe; entries are read-only."""

    def __init__(self, max_entries: int = MAX_CACHED_CORPORA) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, StaticCorpus] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _get(self, key: tuple, build: Callable[[], StaticCorpus]) -> StaticCorpus:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found
        corpus = build()  # outside the lock: a build may take seconds
        with self._lock:
            self._entries[key] = corpus
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return corpus

    def from_path(self, path: str | os.PathLike) -> StaticCorpus:
        """The automaton of a corpus file, built once per (path, size, modification time)."""
        name = os.fspath(path)
        try:
            info = os.stat(name)
        except OSError as err:
            raise SpecDecodeError(f"sam corpus {name!r} cannot be read: {err.strerror}") from None
        key = ("path", os.path.realpath(name), info.st_size, info.st_mtime_ns)
        return self._get(key, lambda: StaticCorpus(read_corpus(name)))

    def from_tokens(self, tokens: Sequence[int]) -> StaticCorpus:
        """The automaton of a token list, built once per distinct content."""
        key = ("tokens", tuple(_token_list(tokens, "corpus_tokens")))
        return self._get(key, lambda: StaticCorpus(key[1]))


HOST_KEY = "sam-corpora"  # the host's ``CorpusCache``


class SamDrafter:
    """One request's SAM-Decoding state: the dynamic automaton of prompt + output, its current
    match, and the match in the (shared, read-only) static automaton if there is one."""

    def __init__(self, num_draft_tokens: int = 8, min_match: int = 1,
                 corpus: StaticCorpus | None = None) -> None:
        self.k, self.min_match, self.corpus = num_draft_tokens, min_match, corpus
        self.automaton = SuffixAutomaton()
        self.seen = 0  # tokens of ctx.tokens already in the automaton
        # (state, length) of the longest suffix of the text that occurred earlier in it ...
        self.dynamic_match: tuple[int, int] = (0, 0)
        # ... and of the longest suffix of the text found in the corpus (before its last token)
        self.static_match: tuple[int, int] = (0, 0)
        self.drafts_from = {"dynamic": 0, "static": 0}  # how many drafts each automaton gave

    def _learn(self, tokens: list[int]) -> None:
        """Add the tokens committed since the last step to both matches (amortised O(1) each)."""
        if len(tokens) < self.seen:
            raise ValueError("the committed tokens shrank: one sam drafter serves one request")
        new = tokens[self.seen:]
        self.seen = len(tokens)
        if not new:
            return
        self.automaton.extend(new)
        self.dynamic_match = self.automaton.earlier_suffix()
        if self.corpus is not None:
            state, matched = self.static_match
            advance = self.corpus.automaton.advance
            for token in new:
                state, matched = advance(state, matched, token)
            self.static_match = (state, matched)

    def propose(self, ctx: DraftContext) -> Draft:
        tokens = ctx.tokens
        self._learn(tokens)
        state, matched = self.dynamic_match
        source: Sequence[int] = tokens
        end = self.automaton.first_end[state]
        if self.corpus is not None and self.static_match[1] > matched:
            state, matched = self.static_match
            source, end = self.corpus.tokens, self.corpus.automaton.first_end[state]
        k = min(DRAFT_PER_MATCHED_TOKEN * matched, self.k, ctx.budget, ctx.max_depth)
        if matched < self.min_match or k <= 0:
            return Draft.empty()
        self.drafts_from["dynamic" if source is tokens else "static"] += 1
        return Draft.chain(source[end + 1:end + 1 + k])

    def observe(self, verdict: Verdict) -> None:
        pass  # committed tokens are learnt from ctx.tokens at the next step


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise SpecDecodeError(f"sam option {name} must be an int >= 1, got {value!r}")
    return int(value)


@register("sam", options={"num_draft_tokens": DEPTH, "min_match": count(1, 256),
                          "corpus": owner_only(), "corpus_tokens": owner_only()})
def build_sam(build: BuildContext, num_draft_tokens: int = 8, min_match: int = 1,
              corpus: str | os.PathLike | None = None,
              corpus_tokens: Sequence[int] | None = None) -> SamDrafter:
    """SAM-Decoding drafter; ``corpus`` (file path) or ``corpus_tokens`` (ints) adds a static
    automaton, cached in the host's ``CorpusCache``."""
    cache = build.host.get(HOST_KEY, CorpusCache) if build is not None else CorpusCache()
    k = _positive_int("num_draft_tokens", num_draft_tokens)
    min_match = _positive_int("min_match", min_match)
    static = None
    if corpus is not None and corpus_tokens is not None:
        raise SpecDecodeError("sam takes corpus (a file) or corpus_tokens (a list), not both")
    if corpus is not None:
        if not isinstance(corpus, (str, os.PathLike)) or not os.fspath(corpus):
            raise SpecDecodeError(f"sam option corpus must be a file path, got {corpus!r}")
        static = cache.from_path(corpus)
        what = f"sam corpus {os.fspath(corpus)!r}"
    elif corpus_tokens is not None:
        if isinstance(corpus_tokens, np.ndarray) and corpus_tokens.ndim == 1:
            corpus_tokens = corpus_tokens.tolist()
        if isinstance(corpus_tokens, (str, bytes)) or not isinstance(corpus_tokens, Sequence):
            raise SpecDecodeError(f"sam option corpus_tokens must be a list of ints, got "
                                  f"{type(corpus_tokens).__name__}")
        if not corpus_tokens:
            raise SpecDecodeError("sam option corpus_tokens is empty")
        static = cache.from_tokens(corpus_tokens)
        what = "sam corpus_tokens"
    vocab = getattr(build.target, "vocab_size", None) if build is not None else None
    if static is not None and vocab is not None and static.max_token >= vocab:
        raise SpecDecodeError(f"{what} holds token id {static.max_token}, outside the target's "
                              f"vocabulary of {vocab}")
    return SamDrafter(k, min_match, static)
