"""The EAGLE-2 dynamic draft tree builder (Li et al., "EAGLE-2: Faster Inference of Language Models
with Dynamic Draft Trees", EMNLP 2024), independent of any model.

A node's score is the product of the draft probabilities along its path from the root: the draft's
estimate of the chance that the target accepts it. Depth 1 holds the root's top-k children. At each
further depth only the top-k nodes of the previous depth (by score) are expanded, each with its
top-k children; a node scoring below ``min_score`` is neither created nor expanded. Finally the best
``max_nodes`` nodes overall are kept (EAGLE-2's reranking). A child never scores above its parent,
so the best nodes are closed under ancestors; ``best_nodes`` enforces it explicitly anyway.

Top-k children are a deterministic function of the context: the tree is a point-mass proposal
(``draft_probs`` None), verified losslessly by the greedy, coupled or point-mass rule.

``rng`` given (rejection sampling): each expanded node instead gets up to k children drawn
independently from its draft distribution, which travels as their ``draft_probs`` so the tree is
verified by recursive rejection sampling (SpecInfer: Miao et al., ASPLOS 2024). Which nodes are
expanded and how many children they get is decided before the children are drawn (it may depend on
the scores of nodes already drawn), and no drawn node is ever dropped for its value: the node budget
is spent while drawing, there is no final reranking (pruning drawn tokens by value is lossy).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from specdecode.sampling import RandomSource

# expand(frontier, tokens, parents) -> [len(frontier), V] draft probabilities of the token after
# each frontier node (-1 is the root, i.e. after the last committed token); ``tokens``/``parents``
# describe the tree built so far (node i's parent is parents[i], -1 for the root)
Expand = Callable[[list[int], list[int], list[int]], torch.Tensor]


@dataclass
class Tree:
    """A built draft tree, parents before children. ``rows`` [n, V]: the distribution each node was
    drawn from (sampled trees only, else None)."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]
    rows: torch.Tensor | None = None


def build_tree(expand: Expand, *, topk: int, depth: int, max_nodes: int, min_score: float = 0.0,
               rng: RandomSource | None = None) -> Tree:
    """Grow the tree depth by depth: at most ``depth`` levels, ``topk`` expanded nodes per level
    with ``topk`` children each, ``max_nodes`` nodes in the result. One ``expand`` call per level."""
    tree = Tree([], [], [], None)
    rows: list[torch.Tensor] = []
    frontier, start = [-1], 0
    for level in range(depth):
        if rng is not None:
            frontier = frontier[:-(-(max_nodes - len(tree.tokens)) // topk)]  # those with room
        if not frontier:
            break
        probs = expand(frontier, tree.tokens, tree.parents)
        start = len(tree.tokens)
        for node, row in zip(frontier, probs):
            base = tree.scores[node] if node >= 0 else 1.0
            if rng is None:
                top, ids = torch.topk(row.double(), min(topk, row.numel()))
                children = [(tok, p) for p, tok in zip(top.tolist(), ids.tolist())
                            if p > 0.0 and base * p >= min_score]
            else:
                count = min(topk, max_nodes - len(tree.tokens))  # decided before drawing
                drawn = [rng.categorical(row) for _ in range(count)]
                children = [(tok, float(row[tok])) for tok in drawn]
                rows.extend([row] * count)
            for tok, p in children:
                tree.tokens.append(tok)
                tree.parents.append(node)
                tree.scores.append(base * p)
        if level == depth - 1:
            break
        new = sorted(range(start, len(tree.tokens)), key=lambda i: (-tree.scores[i], i))
        frontier = [i for i in new[:topk] if tree.scores[i] >= min_score]
    if rng is not None:
        tree.rows = torch.stack(rows) if rows else None
        return tree
    return best_nodes(tree, max_nodes)


def best_nodes(tree: Tree, max_nodes: int) -> Tree:
    """The ``max_nodes`` best-scoring nodes of a point-mass tree, closed under ancestors (a node is
    taken with its missing ancestors, or skipped if they do not fit), in their original order
    (parents first), re-indexed."""
    tokens, parents, scores = tree.tokens, tree.parents, tree.scores
    keep: set[int] = set()
    for node in sorted(range(len(tokens)), key=lambda i: (-scores[i], i)):
        if len(keep) >= max_nodes:
            break
        path = []
        while node >= 0 and node not in keep:
            path.append(node)
            node = parents[node]
        if len(keep) + len(path) <= max_nodes:
            keep.update(path)
    kept = sorted(keep)
    index = {old: new for new, old in enumerate(kept)}
    return Tree([tokens[i] for i in kept], [index.get(parents[i], -1) for i in kept],
                [scores[i] for i in kept], None)
