"""``rest``: retrieval-based drafting from a datastore (He et al., "REST: Retrieval-Based Speculative
Decoding", NAACL 2024).

Each step: find the longest suffix of the context (``max_suffix`` = 16 down to ``min_suffix`` = 2
tokens) that occurs in the datastore's suffix array, take up to ``max_candidates`` of its occurrences
(evenly spaced over the matching range), read the ``num_draft_tokens`` tokens that follow each (up to
the document separator), count every prefix of those continuations in a trie (a node's count is the
number of continuations through it) and draft the ``max_nodes`` most frequent nodes as a tree.

Nodes are emitted best-first by (-count, depth, path in lexicographic order): a child never counts
more than its parent and sits deeper, so every prefix of the node list is a tree (parents first) made
of the most frequent prefixes, which is what the engine's budget truncation needs.

Cost per step: O(log max_suffix) binary searches of O(max_suffix log n) each over the memory-mapped
arrays, then O(m depth log m) for m candidates; nothing depends on the context length and there is no
per-request state. The datastore itself is shared, read-only, and opened once per process
(``specdecode.datastore.open_datastore``, an LRU cache of a few entries). Build one with
``specdecode datastore build`` (or ``build-demo`` for the demo models).

Defaults: ``max_candidates`` 1000 rather than REST's 5000. The sample is stratified over the
matching range (sorted by continuation), so it estimates the frequent prefixes well: on a 3.2M-token
datastore (demo tokenizer) the top-16 nodes from 1000 candidates matched those of the whole range
(16/16 for ranges of 1k-94k occurrences) while gathering + counting took 0.5-0.8 ms instead of
2.5-7 ms for 5000 on this 2-core CPU. ``num_draft_tokens`` 8 and ``max_nodes`` 16 follow the CPU
guidance of small trees (REST's own: 10-token continuations, 64 nodes); both are to be tuned.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from specdecode.datastore import Datastore, open_datastore
from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import DEPTH, NODES, count, owner_only
from specdecode.drafters.registry import Needs, register
from specdecode.types import Draft, SpecDecodeError, Verdict


@dataclass
class PrefixNodes:
    """The trie of a set of continuations, one entry per node (a distinct non-empty prefix).
    ``parents`` index this list (-1: the root); ``first_row`` is the node's first row in the
    lexicographically sorted continuations (a deterministic tie-break)."""

    tokens: np.ndarray
    depths: np.ndarray  # 1 = child of the root
    counts: np.ndarray
    parents: np.ndarray
    first_row: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.size)


def count_prefixes(rows: np.ndarray) -> PrefixNodes:
    """Trie of ``rows`` ([m, depth] int64, -1 after a row's end) by one lexicographic sort: after
    sorting, the rows through a node are a contiguous run, so per depth a node starts where the row
    differs from the previous one in the first d columns, and its count is the run's length."""
    rows = np.asarray(rows, dtype=np.int64)
    empty = np.zeros(0, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] == 0:
        return PrefixNodes(empty, empty, empty, empty, empty)
    rows = rows[rows[:, 0] >= 0]
    m, depth = rows.shape
    if m == 0:
        return PrefixNodes(empty, empty, empty, empty, empty)
    rows = rows[np.lexsort(rows.T[::-1])]
    changed = np.ones((m, depth), dtype=bool)
    changed[1:] = rows[1:] != rows[:-1]
    changed = np.logical_or.accumulate(changed, axis=1)  # [r, d]: prefix r[:d+1] is new at row r
    parts: list[tuple[np.ndarray, ...]] = []
    prev_starts, prev_ids = None, None
    next_id = 0
    for d in range(depth):
        starts = np.flatnonzero(changed[:, d])  # runs of equal d+1-prefixes (ended ones included)
        ends = np.append(starts[1:], m)
        real = rows[starts, d] >= 0
        ids = np.full(starts.size, -1, dtype=np.int64)
        ids[real] = np.arange(next_id, next_id + int(real.sum()))
        if prev_starts is None:
            parent = np.full(int(real.sum()), -1, dtype=np.int64)
        else:
            parent = prev_ids[np.searchsorted(prev_starts, starts[real], side="right") - 1]
        parts.append((rows[starts[real], d], np.full(int(real.sum()), d + 1),
                      (ends - starts)[real], parent, starts[real]))
        next_id += int(real.sum())
        prev_starts, prev_ids = starts, ids
        if not real.any():
            break
    cols = [np.concatenate([p[i] for p in parts]).astype(np.int64) for i in range(5)]
    return PrefixNodes(*cols)


def best_first(nodes: PrefixNodes, budget: int) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the ``budget`` most frequent nodes, ordered by (-count, depth,
    first_row): ancestors always precede descendants (a parent's count is >= its child's and its
    depth smaller), so every prefix of the result is a valid tree; siblings are distinct tokens."""
    if len(nodes) == 0 or budget <= 0:
        return [], []
    order = np.lexsort((nodes.first_row, nodes.depths, -nodes.counts))[:budget]
    position = np.full(len(nodes), -1, dtype=np.int64)
    position[order] = np.arange(order.size)
    parents = np.where(nodes.parents[order] >= 0, position[np.maximum(nodes.parents[order], 0)], -1)
    return nodes.tokens[order].tolist(), parents.tolist()


class RestDrafter:
    """One request's REST drafter; stateless apart from the shared, read-only datastore."""

    def __init__(self, store: Datastore, num_draft_tokens: int = 8, max_nodes: int = 4,
                 max_candidates: int = 1000, min_suffix: int = 2, max_suffix: int = 16) -> None:
        for name, value in (("num_draft_tokens", num_draft_tokens), ("max_nodes", max_nodes),
                            ("max_candidates", max_candidates), ("min_suffix", min_suffix),
                            ("max_suffix", max_suffix)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpecDecodeError(f"rest option {name} must be an integer >= 1, got {value!r}")
        if min_suffix > max_suffix:
            raise SpecDecodeError(f"rest needs min_suffix <= max_suffix, got {min_suffix} > "
                                  f"{max_suffix}")
        if max_suffix > store.sort_depth:
            raise SpecDecodeError(f"rest max_suffix {max_suffix} exceeds the datastore's sort "
                                  f"depth {store.sort_depth}")
        self.store = store
        self.k, self.max_nodes, self.max_candidates = num_draft_tokens, max_nodes, max_candidates
        self.min_suffix, self.max_suffix = min_suffix, max_suffix

    def propose(self, ctx: DraftContext) -> Draft:
        depth = min(self.k, ctx.max_depth)
        budget = min(self.max_nodes, ctx.budget)
        if depth < 1 or budget < 1:
            return Draft.empty()
        tokens = ctx.tokens
        match = self.store.longest_match(tokens[max(0, len(tokens) - self.max_suffix):],
                                         self.min_suffix, self.max_suffix)
        if match is None:
            return Draft.empty()
        length, lo, hi = match
        rows = self.store.continuations(lo, hi, length, depth, self.max_candidates)
        draft_tokens, parents = best_first(count_prefixes(rows), budget)
        if not draft_tokens:
            return Draft.empty()
        return Draft(torch.tensor(draft_tokens, dtype=torch.long),
                     torch.tensor(parents, dtype=torch.long))

    def observe(self, verdict: Verdict) -> None:
        pass


@register("rest", needs=Needs.DATASTORE, options={
    "datastore": owner_only(), "num_draft_tokens": DEPTH, "max_nodes": NODES,
    "max_candidates": owner_only("int", 1, 10**6), "min_suffix": count(1, 64),
    "max_suffix": count(1, 64)})
def build_rest(build: BuildContext, datastore: str | os.PathLike | Datastore | None = None,
               num_draft_tokens: int = 8, max_nodes: int = 4, max_candidates: int = 1000,
               min_suffix: int = 2, max_suffix: int = 16) -> RestDrafter:
    """``datastore`` (required): a directory built by ``specdecode datastore build`` for the
    target's tokenizer (or an open ``Datastore``)."""
    if datastore is None or datastore == "":
        raise SpecDecodeError("rest needs a datastore: -o datastore=DIR (build one with "
                              "`specdecode datastore build` or `specdecode datastore build-demo`)")
    store = datastore if isinstance(datastore, Datastore) else open_datastore(
        str(datastore), build.host.get("datastores", OrderedDict))
    target_vocab = getattr(build.target, "vocab_size", None)
    if target_vocab is not None and int(target_vocab) != store.vocab_size:
        raise SpecDecodeError(
            f"the datastore {store.path} was built for a vocabulary of {store.vocab_size} tokens "
            f"but the target has {target_vocab}: wrong tokenizer (or rebuild with --vocab-size "
            f"{target_vocab} if the target's embedding is padded beyond the tokenizer)")
    return RestDrafter(store, num_draft_tokens, max_nodes, max_candidates, min_suffix, max_suffix)
