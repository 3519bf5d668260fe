"""A suffix automaton over token ids, built online (Blumer et al. 1985; the structure behind
SAM-Decoding, Hu et al., "SAM Decoding: Speculative Decoding via Suffix Automaton", 2024).

The automaton of a text T is the smallest DFA that accepts exactly the substrings of T. Each state
is a class of substrings that share the same set of end positions; it stores its outgoing
transitions (``next``), its suffix link (``link``: the state of the longest suffix that falls in a
different class), the length of its longest string (``length``) and the first end position of its
strings in T (``first_end``), which is where a continuation can be read. A text of n tokens needs at
most 2n - 1 states and 3n - 4 transitions; appending one token costs amortised O(1).

Two kinds of match are tracked, both amortised O(1) per token:

- over the automaton's own text, the longest suffix of T that also occurs *earlier* (ending before
  the last position) is simply the suffix-link target of the newest state: the online construction
  computes it when it walks the suffix links to attach the new token (``earlier_suffix``);
- over a fixed automaton and a separate stream of tokens, the longest suffix of the stream that is a
  substring of T is advanced token by token: follow the transition if there is one, otherwise fall
  back along suffix links (``advance``; matching statistics).

Pure Python (lists and dicts), no dependencies: 100k tokens of random text build in about 0.25 s
into ~125k states taking ~40 MB; repetitive text is faster and smaller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class SuffixAutomaton:
    """Suffix automaton of a growing token sequence. State 0 is the root (the empty string).

    ``first_end[s]`` is the smallest end position (0-based index of the last token) of the strings
    of state ``s``; for a state created by appending position i it is i, a clone inherits it from
    the state it was split from."""

    __slots__ = ("next", "link", "length", "first_end", "last")

    def __init__(self, tokens: Iterable[int] = ()) -> None:
        self.next: list[dict[int, int]] = [{}]
        self.link: list[int] = [-1]
        self.length: list[int] = [0]
        self.first_end: list[int] = [-1]
        self.last = 0  # state of the whole text
        self.extend(tokens)

    def __len__(self) -> int:
        """Number of tokens in the text."""
        return self.length[self.last]

    @property
    def num_states(self) -> int:
        return len(self.length)

    def append(self, token: int) -> None:
        """Append one token (the standard online construction; amortised O(1))."""
        nxt, link, length, first_end = self.next, self.link, self.length, self.first_end
        cur = len(length)
        end = length[self.last]  # position of the new token
        nxt.append({})
        link.append(0)
        length.append(end + 1)
        first_end.append(end)
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:  # split q: the strings of length <= length[p] + 1 now also end at `end`
                clone = len(length)
                nxt.append(nxt[q].copy())
                link.append(link[q])
                length.append(length[p] + 1)
                first_end.append(first_end[q])
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = clone
                link[cur] = clone
        self.last = cur

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(token)

    def earlier_suffix(self) -> tuple[int, int]:
        """(state, length) of the longest suffix of the text that also occurs ending before the
        last position; (0, 0) when there is none. Its first such end is ``first_end[state]``."""
        state = self.link[self.last]
        if state <= 0:
            return 0, 0
        return state, self.length[state]

    def advance(self, state: int, matched: int, token: int) -> tuple[int, int]:
        """Matching statistics: given (state, matched) for the longest suffix of a stream that is a
        substring of the text, the same for the stream extended by ``token`` (amortised O(1))."""
        nxt, link = self.next, self.link
        while state and token not in nxt[state]:
            state = link[state]
            matched = self.length[state]
        target = nxt[state].get(token)
        if target is None:
            return 0, 0
        return target, matched + 1

    def match(self, tokens: Iterable[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of ``tokens`` that is a substring of the text."""
        state = matched = 0
        for token in tokens:
            state, matched = self.advance(state, matched, token)
        return state, matched

    def contains(self, tokens: Sequence[int]) -> bool:
        """Whether ``tokens`` is a substring of the text (the empty sequence always is)."""
        state = 0
        for token in tokens:
            state = self.next[state].get(token, -1)
            if state < 0:
                return False
        return True
