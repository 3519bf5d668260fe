"""Depth-limited suffix trees with counts, and the cross-request store of SuffixDecoding
(Oliaro et al., "SuffixDecoding: Extreme Speculative Decoding for Emerging AI Applications",
2024/2025, Sections 3-4).

``SuffixTree`` holds every suffix of every inserted sequence, cut to ``max_depth`` (D) tokens, in a
path-compressed trie whose nodes carry occurrence counts. Appending one token to a sequence moves
the ends of that sequence's last D suffixes (its "active" nodes) one token deeper: O(D) work per
token, never O(context). A sequence can be removed again (its counts subtracted), which the FIFO
``SuffixStore`` uses for eviction.

Node ``n``: its path string (root to ``n``) is ``ref[n][end[n] - depth[n]:end[n]]``, the edge into it
the last ``length[n]`` tokens of that. ``count[n]`` is the number of start positions (in all
sequences) where the path string occurs, counting only occurrences that fit in D; ``ends[n]`` is
how many of those suffixes end exactly there (cut by D or by the end of their sequence). So
``count = ends + sum(children's counts)``, a string inside an edge has the count of the node below,
and a non-root node with no ends has at least two children: at most 2 nodes per inserted token.
"""

from __future__ import annotations

import heapq
import json
import os
import threading
from collections import deque

from specdecode.types import SpecDecodeError

ROOT = 0


class SuffixTree:
    """All suffixes (cut to ``max_depth`` tokens) of a set of token sequences, with counts."""

    def __init__(self, max_depth: int = 64) -> None:
        if not isinstance(max_depth, int) or max_depth < 1:
            raise SpecDecodeError(f"suffix tree max_depth must be an int >= 1, got {max_depth!r}")
        self.max_depth = max_depth
        self.children: list[dict[int, int] | None] = [{}]
        self.count, self.ends, self.parent = [0], [0], [-1]
        self.length, self.depth, self.end = [0], [0], [0]
        self.ref: list[list[int]] = [[]]
        self.free: list[int] = []
        self.seqs: dict[int, list[int]] = {}
        self.active: dict[int, list[int]] = {}  # open sequences: node of each suffix, longest first

    # -- building -------------------------------------------------------------------------------
    def _new(self, parent: int, length: int, count: int, ref: list[int], end: int) -> int:
        """A node below ``parent`` whose edge has ``length`` tokens, holding one end."""
        depth = self.depth[parent] + length
        if self.free:
            n = self.free.pop()
            self.children[n], self.count[n], self.ends[n], self.parent[n] = None, count, 1, parent
            self.length[n], self.depth[n], self.ref[n], self.end[n] = length, depth, ref, end
            return n
        self.children.append(None)
        self.count.append(count)
        self.ends.append(1)
        self.parent.append(parent)
        self.length.append(length)
        self.depth.append(depth)
        self.ref.append(ref)
        self.end.append(end)
        return len(self.count) - 1

    def first_token(self, n: int) -> int:
        return self.ref[n][self.end[n] - self.length[n]]

    def _merge_if_redundant(self, v: int) -> None:
        """Fold ``v`` into its only child when no suffix ends at ``v`` (keeps the trie compressed)."""
        kids = self.children[v]
        if v == ROOT or self.ends[v] or not kids or len(kids) != 1:
            return
        (c,) = kids.values()
        self.length[c] += self.length[v]  # c's path string is unchanged, so its ref stays valid
        p = self.parent[v]
        self.parent[c] = p
        self.children[p][self.first_token(v)] = c
        self.children[v], self.ref[v] = None, []
        self.free.append(v)

    def _step(self, v: int, tok: int, seq: list[int], e: int) -> int:
        """The suffix ending at node ``v`` grows by ``tok`` (= seq[e - 1]); returns its new node."""
        kids = self.children[v]
        c = kids.get(tok) if kids else None
        if c is None:
            if v != ROOT and self.count[v] == 1:  # a leaf only this suffix reaches: lengthen it
                self.length[v] += 1
                self.depth[v] += 1
                self.ref[v], self.end[v] = seq, e
                return v
            n = self._new(v, 1, 1, seq, e)
            if kids is None:
                self.children[v] = {tok: n}
            else:
                kids[tok] = n
            self.ends[v] -= 1
            return n
        self.ends[v] -= 1
        if self.length[c] == 1:  # the child is exactly the grown string
            self.count[c] += 1
            self.ends[c] += 1
            self.ref[c], self.end[c] = seq, e
            self._merge_if_redundant(v)
            return c
        m = self._new(v, 1, self.count[c] + 1, seq, e)  # split the edge after its first token
        self.length[c] -= 1
        self.parent[c] = m
        self.children[m] = {self.first_token(c): c}
        kids[tok] = m
        self._merge_if_redundant(v)
        return m

    def extend(self, seq_id: int, tokens: list[int]) -> None:
        """Append ``tokens`` to sequence ``seq_id`` (new or open): O(D) per token."""
        if seq_id in self.seqs and seq_id not in self.active:
            raise ValueError(f"sequence {seq_id} is closed")
        seq = self.seqs.setdefault(seq_id, [])
        active = self.active.setdefault(seq_id, [])
        step, limit = self._step, self.max_depth
        for tok in tokens:
            seq.append(tok)
            e = len(seq)
            self.count[ROOT] += 1
            self.ends[ROOT] += 1
            active.append(ROOT)
            for i, v in enumerate(active):
                active[i] = step(v, tok, seq, e)
            if len(active) >= limit:  # the oldest suffix reached D tokens: it ends for good
                del active[0]

    def close(self, seq_id: int) -> None:
        """No more tokens for ``seq_id``: drop its active nodes (its counts stay)."""
        self.active.pop(seq_id, None)

    def suffix_node(self, seq_id: int, m: int) -> int | None:
        """Node of the open sequence's last ``m`` tokens (``1 <= m < D``), in O(1)."""
        active = self.active[seq_id]
        return active[-m] if 1 <= m <= len(active) else None

    def remove(self, seq_id: int) -> None:
        """Subtract every suffix of ``seq_id``: O(D) per token of the sequence."""
        seq = self.seqs.pop(seq_id)
        self.active.pop(seq_id, None)
        count, children, depth = self.count, self.children, self.depth
        for i in range(len(seq)):
            stop = min(self.max_depth, len(seq) - i)
            count[ROOT] -= 1
            v = ROOT
            while depth[v] < stop:
                tok = seq[i + depth[v]]
                c = children[v][tok]
                count[c] -= 1
                if count[c] == 0:  # only this suffix went there: drop that branch
                    del children[v][tok]
                    self._free_subtree(c)
                    self._merge_if_redundant(v)
                    break
                v = c
            else:
                self.ends[v] -= 1
                self._merge_if_redundant(v)

    def _free_subtree(self, n: int) -> None:
        stack = [n]
        while stack:
            x = stack.pop()
            if self.children[x]:
                stack.extend(self.children[x].values())
            self.children[x], self.ref[x] = None, []
            self.free.append(x)

    # -- queries --------------------------------------------------------------------------------
    def locate(self, tokens: list[int], start: int = 0, stop: int | None = None
               ) -> tuple[int, int] | None:
        """Where ``tokens[start:stop]`` ends in the trie: (node, tokens of its edge used), or None."""
        stop = len(tokens) if stop is None else stop
        v, off = ROOT, 0
        length, ref, end, children = self.length, self.ref, self.end, self.children
        for i in range(start, stop):
            t = tokens[i]
            if off == length[v]:
                kids = children[v]
                c = kids.get(t) if kids else None
                if c is None:
                    return None
                v, off = c, 1
            elif ref[v][end[v] - length[v] + off] == t:
                off += 1
            else:
                return None
        return v, off

    def count_of(self, tokens: list[int]) -> int:
        """Occurrences of ``tokens`` (length <= D) over all sequences."""
        pos = self.locate(list(tokens))
        return 0 if pos is None else self.count[pos[0]]

    def longest_match(self, tokens: list[int], limit: int | None = None) -> int:
        """Largest m <= min(limit, D, len) such that the last m tokens occur (binary search: a
        suffix of an occurring string occurs too)."""
        hi = min(len(tokens), self.max_depth, len(tokens) if limit is None else limit)
        lo = 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.locate(tokens, len(tokens) - mid) is None:
                hi = mid - 1
            else:
                lo = mid
        return lo

    def expand(self, node: int, off: int, budget: int, max_depth: int, min_prob: float
               ) -> tuple[list[int], list[int], float]:
        """Best-first draft tree below a match position (paper: "tree speculation"): a child's
        probability is its parent's times ``count(child) / count(parent's continuations)``; nodes
        below ``min_prob`` are never taken. Returns (tokens, parents, summed probability), best
        nodes first (so any prefix is the best smaller tree). Ties: higher count, then lower token
        id, then earlier pushed; the result depends only on the counts, not on insertion history."""
        tokens: list[int] = []
        parents: list[int] = []
        score = 0.0
        heap: list[tuple[float, int, int, int, int, int, int]] = []
        tick = 0
        length, count, ends, children = self.length, self.count, self.ends, self.children
        item = (-1.0, 0, node, off, -1, -1, 0)  # (-prob, tick, node, off, token, parent, depth)
        while True:
            neg, _, v, o, tok, parent, d = item
            if tok >= 0:
                tokens.append(tok)
                parents.append(parent)
                score -= neg
                if len(tokens) >= budget:
                    break
            if d < max_depth:
                here = len(tokens) - 1
                if o < length[v]:  # inside an edge: the only continuation, same probability
                    tick += 1
                    heapq.heappush(heap, (neg, tick, v, o + 1, self.ref[v][self.end[v] - length[v] + o],
                                          here, d + 1))
                elif children[v]:
                    prob, denom = -neg, count[v] - ends[v]
                    kids = [(-count[c], t, c) for t, c in children[v].items()
                            if prob * count[c] / denom >= min_prob]
                    kids.sort()
                    for negc, t, c in kids:
                        tick += 1
                        heapq.heappush(heap, (-(prob * -negc / denom), tick, c, 1, t, here, d + 1))
            if not heap:
                break
            item = heapq.heappop(heap)
        return tokens, parents, score


class SuffixStore:
    """SuffixDecoding's global tree: the outputs of earlier requests of this process, at most
    ``cache_size`` tokens, oldest output evicted first (FIFO by insertion). Thread-safe through
    ``lock`` (drafters hold it while they read ``tree``). An output longer than ``cache_size`` is
    cut to its first ``cache_size`` tokens. ``save``/``load`` write and read the held outputs as
    JSON; loading rebuilds the tree (O(D) per token)."""

    FORMAT = "specdecode-suffix-store"

    def __init__(self, cache_size: int = 100_000, max_depth: int = 64) -> None:
        self.lock = threading.RLock()
        self.cache_size = self._check_size(cache_size)
        self.tree = SuffixTree(max_depth)
        self.held: deque[tuple[int, int]] = deque()  # (sequence id, tokens), oldest first
        self.num_tokens = 0
        self.next_id = 0
        self.loaded_files: set[str] = set()

    @staticmethod
    def _check_size(cache_size: int) -> int:
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise SpecDecodeError(f"cache_size must be an int >= 0, got {cache_size!r}")
        return cache_size

    @property
    def max_depth(self) -> int:
        return self.tree.max_depth

    def __len__(self) -> int:
        return len(self.held)

    def sequences(self) -> list[list[int]]:
        """The held outputs, oldest first."""
        with self.lock:
            return [list(self.tree.seqs[i]) for i, _ in self.held]

    def configure(self, cache_size: int | None = None, max_depth: int | None = None) -> None:
        """Change the bounds: a smaller ``cache_size`` evicts now; a new ``max_depth`` rebuilds."""
        with self.lock:
            if cache_size is not None:
                self.cache_size = self._check_size(cache_size)
            if max_depth is not None and max_depth != self.tree.max_depth:
                SuffixTree(max_depth)  # validates before anything changes
                self._refill(self.sequences(), max_depth)
            self._evict()

    def clear(self) -> None:
        """Forget every output (and which files were loaded)."""
        with self.lock:
            self._refill([], self.tree.max_depth)
            self.loaded_files.clear()

    def _refill(self, seqs: list[list[int]], max_depth: int) -> None:
        self.tree, self.held, self.num_tokens = SuffixTree(max_depth), deque(), 0
        for s in seqs:
            self.add(s)

    def add(self, tokens: list[int]) -> None:
        """Learn one finished output (paper: only outputs enter the global tree)."""
        with self.lock:
            seq = [int(t) for t in tokens[:self.cache_size]]
            if not seq:
                return
            sid, self.next_id = self.next_id, self.next_id + 1
            self.tree.extend(sid, seq)
            self.tree.close(sid)
            self.held.append((sid, len(seq)))
            self.num_tokens += len(seq)
            self._evict()

    def _evict(self) -> None:
        while self.num_tokens > self.cache_size:
            sid, n = self.held.popleft()
            self.tree.remove(sid)
            self.num_tokens -= n

    def save(self, path: str | os.PathLike) -> None:
        """Write the held outputs to ``path`` (JSON; written to a temporary file, then renamed)."""
        with self.lock:
            data = {"format": self.FORMAT, "version": 1, "max_depth": self.tree.max_depth,
                    "cache_size": self.cache_size, "sequences": self.sequences()}
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError as err:
            raise SpecDecodeError(f"cannot write the suffix cache {os.fspath(path)!r}: {err}") from err

    def load(self, path: str | os.PathLike) -> None:
        """Replace the held outputs with those saved in ``path`` (the store keeps its own bounds:
        the oldest are evicted if they exceed ``cache_size``). A missing, unreadable or corrupt
        file raises ``SpecDecodeError`` and leaves the store unchanged."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                data = json.loads(f.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise SpecDecodeError(f"cannot read the suffix cache {name!r}: {err}") from err
        seqs = data.get("sequences") if isinstance(data, dict) else None
        if (not isinstance(data, dict) or data.get("format") != self.FORMAT or not isinstance(seqs, list)
                or not all(isinstance(s, list) and all(type(t) is int and t >= 0 for t in s)
                           for s in seqs)):
            raise SpecDecodeError(f"{name!r} is not a specdecode suffix cache (corrupt or another format)")
        with self.lock:
            self._refill(seqs, self.tree.max_depth)
            self.loaded_files.add(os.path.abspath(name))
