"""``suffix``: SuffixDecoding (Oliaro, Jia, Campos, Qiao, "SuffixDecoding: Extreme Speculative
Decoding for Emerging AI Applications", 2024/2025; reference implementation: Snowflake
ArcticInference, also vLLM's ``suffix`` method).

Two depth-limited suffix trees with counts (``suffix_tree.py``):

- a per-request tree over prompt + output, extended at each ``propose`` with the tokens committed
  since the last one (O(max_depth) per new token);
- a global ``SuffixStore`` over the outputs of earlier requests of this host (``build.host``'s by
  default), which learns a request's output in ``finish(output)``; at most ``cache_size`` tokens,
  FIFO eviction by insertion order.

Drafting (the paper's tree mode). For each match length m (longest first, m < max_depth) where the
last m context tokens occur in a tree, expand best-first from the match: a node's probability is
its parent's times count(child) / count(parent's continuations), nodes under ``min_prob`` are
dropped, at most min(max_nodes, floor(alpha * m + offset)) nodes and ``num_draft_tokens`` levels.
The draft with the highest summed probability wins: per-request tree first, then the global one,
each longest match first, a later candidate replacing the best only if strictly higher (the
reference's tie rules). A candidate whose upper bound min(nodes, levels) cannot beat the best so
far is skipped without being built. Nodes come best-first, so any prefix is the best smaller tree.

Options and defaults:
- ``num_draft_tokens=16`` (depth cap) and ``max_nodes=16``: the reference caps only the node
  count; a depth cap equal to it never binds before the node budget, so an exact repeat can be
  drafted as a 16-token chain. 16 nodes keep a CPU verification forward cheap; tune by measurement.
- ``alpha=1.0``, ``offset=0.0``: the paper's / reference's ``max_spec_factor`` and offset (a match of
  m tokens earns at most m draft nodes, so short, unreliable matches draft little).
- ``min_prob=0.1``: the paper's threshold.
- ``max_depth=64``: D of both trees (the paper's 64); matches use the last D - 1 tokens.
- ``cache_size=100_000``: tokens held by the global store (the reference bounds requests instead).
- ``use_global=True``; ``store``: a ``SuffixStore`` to use instead of the host's (``HOST_KEY``);
  ``cache_file``: a JSON file the store is loaded from the first time a request names it (if it
  exists) and saved to after every ``finish``.

The store's bounds follow the latest request's options: a request with another ``cache_size``
re-bounds the shared store (evicting at once if smaller), another ``max_depth`` rebuilds it from the
outputs it holds. The store belongs to the host (a ``Scheduler``, a model's plain ``generate``
calls, a benchmark method: ``specdecode/host.py``); two hosts never share one.

Deviation from the reference: the reference divides a child's count by its parent's full count,
which includes occurrences with no continuation (the live one at the end of the context, the ends
of earlier outputs); we divide by the parent's continuations only (the sum of its children's
counts). Otherwise the per-request tree, which always holds the live occurrence, would be scored
lower than the global tree for the same evidence.
"""

from __future__ import annotations

import math
import os

import torch

from specdecode.drafters.base import BuildContext, DraftContext
from specdecode.drafters.options import DEPTH, NODES, Option, owner_only
from specdecode.drafters.registry import register
from specdecode.drafters.suffix_tree import SuffixStore, SuffixTree
from specdecode.types import Draft, SpecDecodeError, Verdict

HOST_KEY = "suffix"  # the host's store, shared by its ``suffix`` drafters unless ``store`` is given


class SuffixDrafter:
    """One request's SuffixDecoding state: its own suffix tree and a handle on the shared store."""

    def __init__(self, num_draft_tokens: int = 16, max_nodes: int = 16, alpha: float = 1.0,
                 offset: float = 0.0, min_prob: float = 0.1, max_depth: int = 64,
                 store: SuffixStore | None = None, cache_file: str | None = None) -> None:
        self.k, self.max_nodes = num_draft_tokens, max_nodes
        self.alpha, self.offset, self.min_prob = alpha, offset, min_prob
        self.tree = SuffixTree(max_depth)
        self.store, self.cache_file = store, cache_file
        self.seen = 0  # ctx.tokens[:seen] are in self.tree (sequence 0)

    def _search(self, tree: SuffixTree, position, max_m: int, depth: int, cap: int,
                best: list) -> None:
        """Try match lengths max_m..1 in ``tree``; ``best`` = [score, tokens, parents] is updated
        when a draft scores strictly higher. ``position(m)`` gives the match's (node, offset)."""
        for m in range(max_m, 0, -1):
            budget = min(cap, math.floor(self.alpha * m + self.offset + 1e-9))
            if min(budget, depth, tree.max_depth - m) <= best[0]:
                continue  # summed probability <= nodes and <= levels (each level sums to <= 1)
            pos = position(m)
            if pos is None:
                continue
            tokens, parents, score = tree.expand(pos[0], pos[1], budget, depth, self.min_prob)
            if score > best[0]:
                best[:] = [score, tokens, parents]

    def propose(self, ctx: DraftContext) -> Draft:
        tokens = ctx.tokens
        if len(tokens) > self.seen:
            self.tree.extend(0, tokens[self.seen:])
            self.seen = len(tokens)
        depth, cap = min(self.k, ctx.max_depth), min(self.max_nodes, ctx.budget)
        if depth < 1 or cap < 1:
            return Draft.empty()
        best: list = [0.0, [], []]
        local = self.tree

        def local_position(m: int) -> tuple[int, int] | None:
            node = local.suffix_node(0, m)  # the live occurrence's node: O(1)
            return None if node is None else (node, local.length[node])

        self._search(local, local_position, min(len(tokens), local.max_depth - 1), depth, cap, best)
        if self.store is not None:
            with self.store.lock:
                glob = self.store.tree
                window = tokens[max(0, len(tokens) - glob.max_depth + 1):]
                n = len(window)
                longest = glob.longest_match(window)
                self._search(glob, lambda m: glob.locate(window, n - m, n), longest, depth, cap, best)
        if not best[1]:
            return Draft.empty()
        return Draft(torch.tensor(best[1], dtype=torch.long), torch.tensor(best[2], dtype=torch.long))

    def observe(self, verdict: Verdict) -> None:
        pass  # committed tokens are learned at the next propose, from ctx.tokens

    def finish(self, output: list[int]) -> None:
        """The global store learns this request's output (and saves it, given a ``cache_file``)."""
        if self.store is None:
            return
        self.store.add(output)
        if self.cache_file is not None:
            self.store.save(self.cache_file)


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecDecodeError(f"suffix option {name} must be an int >= {low}, got {value!r}")
    return value


def _check_float(name: str, value, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SpecDecodeError(f"suffix option {name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


@register("suffix", options={
    "num_draft_tokens": DEPTH, "max_nodes": NODES, "alpha": Option("float", 0.0, (1000.0,)),
    "offset": Option("float", -1000.0, (1000.0,)), "min_prob": Option("float", 0.0, (1.0,)),
    "max_depth": owner_only("int", 2, 4096), "cache_size": owner_only("int", 0, 10**9),
    "cache_file": owner_only(), "use_global": owner_only("bool"), "store": owner_only()})
def build_suffix(build: BuildContext, num_draft_tokens: int = 16, max_nodes: int = 16,
                 alpha: float = 1.0, offset: float = 0.0, min_prob: float = 0.1, max_depth: int = 64,
                 cache_size: int = 100_000, cache_file: str | None = None, use_global: bool = True,
                 store: SuffixStore | None = None) -> SuffixDrafter:
    """A SuffixDecoding drafter for one request (options: see the module docstring)."""
    _check_int("num_draft_tokens", num_draft_tokens, 1)
    _check_int("max_nodes", max_nodes, 1)
    _check_int("max_depth", max_depth, 2)
    _check_int("cache_size", cache_size, 0)
    alpha = _check_float("alpha", alpha, 0.0)
    offset = _check_float("offset", offset, -math.inf)
    min_prob = _check_float("min_prob", min_prob, 0.0, 1.0)
    if use_global not in (True, False):  # also accepts 0 / 1
        raise SpecDecodeError(f"suffix option use_global must be true or false, got {use_global!r}")
    if store is not None and not isinstance(store, SuffixStore):
        raise SpecDecodeError("suffix option store must be a SuffixStore")
    if cache_file is not None:
        if not isinstance(cache_file, (str, os.PathLike)) or not os.fspath(cache_file):
            raise SpecDecodeError(f"suffix option cache_file must be a file path, got {cache_file!r}")
        if not use_global:
            raise SpecDecodeError("suffix option cache_file needs use_global=true")
        cache_file = os.fspath(cache_file)
    if not use_global:
        return SuffixDrafter(num_draft_tokens, max_nodes, alpha, offset, min_prob, max_depth)
    store = build.host.get(HOST_KEY, SuffixStore) if store is None else store
    store.configure(cache_size=cache_size, max_depth=max_depth)
    if cache_file is not None and os.path.abspath(cache_file) not in store.loaded_files:
        if os.path.exists(cache_file):
            store.load(cache_file)
        store.loaded_files.add(os.path.abspath(cache_file))
    return SuffixDrafter(num_draft_tokens, max_nodes, alpha, offset, min_prob, max_depth, store,
                         cache_file)
