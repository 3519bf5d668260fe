"""``token-recycling``: Token Recycling (Luo et al., "Turning Trash into Treasure: Accelerating
Inference of Large Language Models with Token Recycling", 2024).

The target's own top-k predictions, computed anyway during verification (for every tree node,
rejected ones included), are recycled into an adjacency table ``A[V, k]``: row ``t`` holds the k
tokens the target ranked highest after ``t`` the last time it predicted after ``t``. A draft expands
a static tree template from the last committed token by gathering from the table: a node's token is
``A[parent token][rank]``.

Table updates: the drafter declares ``feedback_topk = topk``. Its first ``propose`` seeds the table
from the prompt's prefill predictions (prompt token j -> prefill row j; within the prompt the latest
occurrence wins), so the first step already drafts. After every step ``observe`` writes
``A[row_tokens[r]] = topk_ids[r]`` for every verified row r (the pending token and each draft node).
Duplicate rule (one token on several rows of one update, deterministic): rows are applied in the
order *draft rows off the accepted path, then the accepted path (pending token first)*, and the last
one applied wins. So a token's row comes preferably from the accepted path (predictions made in the
real context), else from its deepest rejected occurrence. A token never seen has no successors
(sentinel -1) and is skipped.

Tree template: the published shape (80 nodes below the root, depth 6, widths 8-21-25-15-8-3),
derived here from a Zipf rank prior: rank r is taken to be (r + 1) times less likely than rank 0,
so a node's weight is 1 / prod(rank + 1) over its path, and each depth keeps the ``width`` heaviest
children of the previous depth's nodes (any Zipf exponent gives the same tree). The node budget
keeps a prefix of a priority order by ``2**-depth / prod(rank + 1)`` (each deeper step is also taken
to halve the chance): parents always come first, so every prefix is a tree, best ranks first.

Cost per step: the update is two vectorised numpy assignments over the n + 1 rows (O(n log n) for
the duplicate rule), the draft is one gather per depth over the <= 80 template nodes plus a
vectorised sibling dedup: O(nodes), never O(context) or O(V). Allocating a table is O(V k) once.

``hot=True`` keeps one table per (vocab size, topk) across the requests of one host (a
``Scheduler``, a model's plain ``generate`` calls: ``specdecode/host.py``), in its ``RecyclingStore``
(bounded: at most ``max_tables`` tables, least recently used evicted).
Hot and cold starts differ: a hot request drafts from its first step with what earlier requests
(of any model with the same vocabulary size) taught the table, a cold one starts from the prompt's
prefill predictions only. The paper reports 2.08x hot vs 1.93x cold.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import DEPTH, NODES, Option, owner_only
from specdecode.drafters.registry import register
from specdecode.types import Draft, SpecDecodeError, Verdict

#: Published template shape: nodes per depth below the root (80 nodes, depth 6).
PUBLISHED_WIDTHS = (8, 21, 25, 15, 8, 3)
#: Ranks the published template draws from (the paper's table holds the top 8).
TEMPLATE_RANKS = 8


@dataclass(frozen=True)
class Template:
    """A static tree template, nodes in breadth-first order (children of one parent by rank).

    ``parent[i]`` is a node index (-1: the root, i.e. the last committed token), ``rank[i]`` the
    column of the parent's table row, ``depth[i]`` >= 1; ``levels[d]`` = (start, end) of depth d + 1
    in the BFS order; ``priority`` is a permutation of the nodes where each prefix is a tree."""

    parent: np.ndarray
    rank: np.ndarray
    depth: np.ndarray
    levels: tuple[tuple[int, int], ...]
    priority: np.ndarray

    def __len__(self) -> int:
        return int(self.parent.size)


@lru_cache(maxsize=16)  # a pure function's memo: a template is a constant of its arguments
def build_template(ranks: int = TEMPLATE_RANKS, widths: tuple[int, ...] = PUBLISHED_WIDTHS
                   ) -> Template:
    """The template with ``widths`` nodes per depth, children drawn from ranks ``0..ranks-1``.

    Each depth keeps the ``width`` candidates (children of the previous depth's nodes) with the
    smallest product of (rank + 1) along the path, ties broken by BFS position; integers keep the
    comparison exact."""
    if ranks < 1:
        raise SpecDecodeError(f"template needs ranks >= 1, got {ranks}")
    parent: list[int] = []
    rank: list[int] = []
    depth: list[int] = []
    weight: list[int] = []  # prod(rank + 1) along the path, smaller = more likely
    levels: list[tuple[int, int]] = []
    previous = [-1]  # node indices of the previous depth (-1 = root)
    for d, width in enumerate(widths, start=1):
        candidates = []
        for p in previous:
            base = 1 if p < 0 else weight[p]
            for r in range(ranks):
                candidates.append((base * (r + 1), len(candidates), p, r))
        kept = sorted(sorted(candidates)[:width], key=lambda c: c[1])  # back to BFS order
        start = len(parent)
        for w, _, p, r in kept:
            parent.append(p)
            rank.append(r)
            depth.append(d)
            weight.append(w)
        levels.append((start, len(parent)))
        previous = list(range(start, len(parent)))
        if not previous:
            break
    # priority key 2**depth * prod(rank + 1): a child's key is at least twice its parent's
    order = sorted(range(len(parent)), key=lambda i: ((1 << depth[i]) * weight[i], i))
    parent_a, rank_a, depth_a, order_a = (np.asarray(xs, dtype=np.int64)
                                          for xs in (parent, rank, depth, order))
    return Template(parent_a, rank_a, depth_a, tuple(levels), order_a)


def new_table(vocab_size: int, topk: int) -> np.ndarray:
    """An empty table: ``[V + 1, k]`` of -1. Row V stays -1 forever, so gathering with a missing
    parent token (-1) lands on it and yields -1 again (missing nodes drop their descendants)."""
    return np.full((vocab_size + 1, topk), -1, dtype=np.int32)


class RecyclingStore:
    """Tables shared across requests of one process (``hot=True``), one per (vocab size, topk),
    at most ``max_tables`` of them (least recently used evicted). Tables are updated in place by
    the drafters using them; requests running concurrently share (and race on) a table, which
    costs acceptance, never correctness."""

    def __init__(self, max_tables: int = 4) -> None:
        if max_tables < 1:
            raise SpecDecodeError(f"max_tables must be >= 1, got {max_tables}")
        self.max_tables = max_tables
        self.tables: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def table(self, vocab_size: int, topk: int) -> np.ndarray:
        key = (vocab_size, topk)
        if key in self.tables:
            self.tables.move_to_end(key)
        else:
            self.tables[key] = new_table(vocab_size, topk)
            while len(self.tables) > self.max_tables:
                self.tables.popitem(last=False)
        return self.tables[key]

    def clear(self) -> None:
        self.tables.clear()


HOST_KEY = "token-recycling"  # the host's store behind ``hot=True``


def last_wins(rows: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``order`` (row indices, in application order) with the last write winning: returns
    (distinct tokens, the winning row of each)."""
    reversed_order = order[::-1]
    tokens, first = np.unique(rows[reversed_order], return_index=True)
    return tokens, reversed_order[first]


class TokenRecyclingDrafter:
    """One request's Token Recycling drafter; ``table`` is its own (cold) or the store's (hot)."""

    def __init__(self, table: np.ndarray, num_draft_tokens: int = 6, max_nodes: int = 12) -> None:
        self.table = table
        self.vocab_size = table.shape[0] - 1
        self.topk = table.shape[1]
        self.feedback_topk = self.topk
        self.depth, self.max_nodes = num_draft_tokens, max_nodes
        self.template = build_template(min(self.topk, TEMPLATE_RANKS))

    def update(self, row_tokens: np.ndarray, topk_ids: np.ndarray, order: np.ndarray) -> None:
        """``table[row_tokens[r]] = topk_ids[r]`` for r in ``order``, the last write winning."""
        if order.size == 0:
            return
        ids = topk_ids[:, :self.topk]
        if ids.shape[1] < self.topk:  # fewer predictions than columns: the rest stays missing
            ids = np.concatenate([ids, np.full((ids.shape[0], self.topk - ids.shape[1]), -1,
                                               dtype=ids.dtype)], axis=1)
        tokens, winners = last_wins(row_tokens, order)
        self.table[tokens] = ids[winners]

    def expand(self, root: int, max_depth: int) -> np.ndarray:
        """Token of every template node of depth <= max_depth (-1: dropped), BFS order."""
        tpl, table = self.template, self.table
        tokens = np.full(len(tpl), -1, dtype=np.int64)
        for d, (start, end) in enumerate(tpl.levels[:max_depth]):
            parents = tpl.parent[start:end]
            parent_tokens = np.full(end - start, root) if d == 0 else tokens[parents]
            level = table[parent_tokens, tpl.rank[start:end]].astype(np.int64)
            # duplicate siblings (same parent node, same token): keep the best rank only
            ok = np.flatnonzero(level >= 0)
            if ok.size > 1:
                keys = parents[ok] * (self.vocab_size + 1) + level[ok]
                _, first = np.unique(keys, return_index=True)
                if first.size < ok.size:
                    keep = np.zeros(ok.size, dtype=bool)
                    keep[first] = True
                    level[ok[~keep]] = -1
            tokens[start:end] = level
        return tokens

    def propose(self, ctx: DraftContext) -> Draft:
        prefill = ctx.prefill_topk_ids
        if prefill is not None and prefill.shape[0]:  # first proposal: learn from the prompt
            m = min(int(prefill.shape[0]), len(ctx.tokens))
            rows = np.asarray(ctx.tokens[:m], dtype=np.int64)
            self.update(rows, prefill[:m].cpu().numpy(), np.arange(m))
        depth = min(self.depth, ctx.max_depth, len(self.template.levels))
        budget = min(self.max_nodes, ctx.budget)
        if depth < 1 or budget < 1:
            return Draft.empty()
        tpl = self.template
        tokens = self.expand(ctx.tokens[-1], depth)
        order = tpl.priority
        chosen = order[(tokens[order] >= 0) & (tpl.depth[order] <= depth)][:budget]
        new_index = np.full(len(tpl) + 1, -1, dtype=np.int64)  # slot 0 = the root
        new_index[chosen + 1] = np.arange(chosen.size)
        parents = new_index[tpl.parent[chosen] + 1]
        return Draft(torch.from_numpy(tokens[chosen]), torch.from_numpy(parents))

    def observe(self, verdict: Verdict) -> None:
        feedback = verdict.feedback
        if feedback is None:  # used without the feedback channel: nothing to learn
            return
        rows = np.asarray(feedback.row_tokens, dtype=np.int64)
        on_path = np.zeros(rows.size, dtype=bool)
        on_path[0] = True
        path = np.asarray(verdict.path, dtype=np.int64) + 1
        on_path[path[path < rows.size]] = True
        order = np.concatenate([np.flatnonzero(~on_path), np.flatnonzero(on_path)])
        self.update(rows, feedback.topk_ids.cpu().numpy(), order)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SpecDecodeError(f"token-recycling option {name} must be an int >= 1, got {value!r}")
    return value


@register("token-recycling", options={
    "num_draft_tokens": DEPTH, "max_nodes": NODES, "hot": owner_only("bool"),
    "topk": Option("int", 1, (64, "vocab"), owner_if="hot")})
def build_token_recycling(build: BuildContext, num_draft_tokens: int = 6, max_nodes: int = 12,
                          topk: int = 8, hot: bool = False) -> TokenRecyclingDrafter:
    """Token Recycling (Luo et al., 2024). ``num_draft_tokens``: maximum tree depth (the template
    has 6 levels); ``max_nodes``: node budget per draft; ``topk``: table width (successors kept per
    token; the template uses ranks < 8); ``hot``: share the table across the host's requests."""
    num_draft_tokens = _positive_int("num_draft_tokens", num_draft_tokens)
    max_nodes = _positive_int("max_nodes", max_nodes)
    topk = _positive_int("topk", topk)
    if not isinstance(hot, bool):
        raise SpecDecodeError(f"token-recycling option hot must be true or false, got {hot!r}")
    vocab_size = int(build.target.vocab_size)
    width = min(topk, vocab_size)  # the engine's feedback has min(topk, V) columns
    table = build.host.get(HOST_KEY, RecyclingStore).table(vocab_size, width) if hot \
        else new_table(vocab_size, width)
    return TokenRecyclingDrafter(table, num_draft_tokens, max_nodes)
