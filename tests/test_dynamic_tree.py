"""EAGLE-2 dynamic draft trees: the builder's invariants on toy distributions, the acceptance rules
on builder trees by exact enumeration (TESTING.md L0), the draft model's incremental tree forward
against fresh forwards, and greedy / coupled identity with vanilla decoding."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from conftest import ARCHS, make_prompts, tiny_model, vanilla
from enumerate_rules import sequence_distribution, target_sequence_distribution, total_variation, \
    toy_probs

import specdecode as sd
import specdecode.drafters.draft_model as draft_model
from specdecode import Draft
from specdecode.drafters.base import DraftContext
from specdecode.drafters.dynamic_tree import Tree, best_nodes, build_tree
from specdecode.models.hf import HFModel
from specdecode.sampling import TorchRandom, processed_probs
from specdecode.types import SamplingParams, SpecDecodeError
from specdecode.verify import verify_rejection

V = 8


def dist(path: tuple[int, ...]) -> torch.Tensor:
    """A path-dependent draft distribution over V tokens, some probabilities exactly 0."""
    gen = torch.Generator().manual_seed(hash(path) % (2**31))
    weights = torch.rand(V, generator=gen, dtype=torch.float64) ** 3
    weights[int(torch.randint(0, V, (), generator=gen))] = 0.0
    return weights / weights.sum()


def paths_of(tokens: list[int], parents: list[int]) -> list[tuple[int, ...]]:
    paths: list[tuple[int, ...]] = []
    for tok, par in zip(tokens, parents):
        paths.append((paths[par] if par >= 0 else ()) + (tok,))
    return paths


class Recorder:
    """``expand`` over ``dist``, recording every frontier it is asked for."""

    def __init__(self, context: tuple[int, ...] = (), draft=dist) -> None:
        self.context, self.draft, self.calls = context, draft, []

    def __call__(self, frontier, tokens, parents):
        self.calls.append(list(frontier))
        paths = paths_of(tokens, parents)
        return torch.stack([self.draft(self.context + (paths[n] if n >= 0 else ())) for n in frontier])


def check_tree(tree: Tree, *, topk: int, depth: int, max_nodes: int, min_score: float,
               context: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    n = len(tree.tokens)
    assert len(tree.parents) == len(tree.scores) == n <= max_nodes
    assert all(-1 <= p < i for i, p in enumerate(tree.parents))  # parents kept, and first
    paths = paths_of(tree.tokens, tree.parents)
    assert max((len(p) for p in paths), default=0) <= depth
    for i, path in enumerate(paths):
        expected = 1.0
        for j in range(len(path)):
            expected *= float(dist(context + path[:j])[path[j]])
        assert tree.scores[i] == pytest.approx(expected, rel=1e-12, abs=0)
        parent = tree.parents[i]
        assert tree.scores[i] <= (tree.scores[parent] if parent >= 0 else 1.0)
    return paths


SHAPES = list(itertools.product([1, 2, 3], [1, 2, 4], [1, 3, 7, 40], [0.0, 0.02]))


@pytest.mark.parametrize("topk,depth,max_nodes,min_score", SHAPES)
def test_point_mass_tree_invariants(topk, depth, max_nodes, min_score):
    expand = Recorder()
    tree = build_tree(expand, topk=topk, depth=depth, max_nodes=max_nodes, min_score=min_score)
    assert tree.rows is None
    paths = check_tree(tree, topk=topk, depth=depth, max_nodes=max_nodes, min_score=min_score)
    assert len(set(paths)) == len(paths)  # top-k children are distinct
    assert all(s >= min_score for s in tree.scores)
    for path in paths:  # each node is one of its parent's k likeliest children
        row = dist(path[:-1])
        assert row[path[-1]] > 0 and int((row > row[path[-1]]).sum()) < topk
    # one expansion per depth, at most k nodes each, the root first
    assert len(expand.calls) <= depth and expand.calls[0] == [-1]
    assert all(len(c) <= topk for c in expand.calls)
    # against the whole tree (no node budget): the kept nodes are its best ones, and only the
    # k best nodes of a depth have children
    full = build_tree(Recorder(), topk=topk, depth=depth, max_nodes=10**6, min_score=min_score)
    full_paths = paths_of(full.tokens, full.parents)
    score = dict(zip(full_paths, full.scores))
    assert set(paths) <= set(full_paths) and len(paths) == min(max_nodes, len(full_paths))
    dropped = [score[p] for p in full_paths if p not in set(paths)]
    assert not dropped or min(tree.scores) >= max(dropped)
    for level in range(1, depth):
        nodes = sorted((p for p in full_paths if len(p) == level), key=lambda p: -score[p])
        expanded = {p[:-1] for p in full_paths if len(p) == level + 1}
        assert expanded <= set(nodes[:topk])


def test_min_score_stops_expansion_early():
    expand = Recorder()
    tree = build_tree(expand, topk=2, depth=6, max_nodes=50, min_score=0.3)
    assert len(expand.calls) < 6 and all(s >= 0.3 for s in tree.scores)
    assert build_tree(Recorder(), topk=2, depth=3, max_nodes=5, min_score=2.0).tokens == []


def test_best_nodes_keeps_ancestors_even_when_children_outscore_them():
    # scores that rise along paths (a builder never makes them, best_nodes must not rely on it)
    tree = Tree([5, 6, 7, 8, 9], [-1, 0, 1, -1, 3], [0.1, 0.2, 0.9, 0.5, 0.4])
    for m in range(6):
        kept = best_nodes(tree, m)
        assert len(kept.tokens) <= m
        assert all(-1 <= p < i for i, p in enumerate(kept.parents))
        # the deep node (0.9) is worth taking with its two ancestors as soon as three fit
        assert (7 in kept.tokens) == (m >= 3)
    assert best_nodes(tree, 1).tokens == [8]


@pytest.mark.parametrize("topk,depth,max_nodes", [(1, 3, 3), (2, 2, 3), (2, 3, 5), (3, 3, 7),
                                                  (2, 4, 20)])
def test_sampled_tree_invariants(topk, depth, max_nodes):
    for seed in range(20):
        expand = Recorder()
        tree = build_tree(expand, topk=topk, depth=depth, max_nodes=max_nodes,
                          rng=TorchRandom(seed))
        paths = check_tree(tree, topk=topk, depth=depth, max_nodes=max_nodes, min_score=0.0)
        # each node was drawn from its parent's row, which travels with it
        expected = torch.stack([dist(p[:-1]) for p in paths])
        assert torch.equal(tree.rows, expected)
        # the budget is spent, never a drawn node dropped: all that the shape allows
        assert len(paths) == min(max_nodes, topk + (depth - 1) * topk * topk)


HORIZON = 4
TARGET = target_sequence_distribution(HORIZON)


def target_rows(context, tokens, parents):
    return torch.stack([toy_probs(context, 0)] + [toy_probs(context + p, 0)
                                                  for p in paths_of(tokens, parents)])


def tree_step(context, *, topk, depth, max_nodes, sampled=False, rows="own", prune_to=None):
    """One step: a builder tree over the toy draft (salt 1), verified by recursive rejection
    (draft_probs given) or the point-mass rule (None). ``rows``/``prune_to`` make broken variants."""

    def step(rng):
        tree = build_tree(Recorder(context, lambda c: toy_probs(c, 1)), topk=topk, depth=depth,
                          max_nodes=max_nodes, rng=rng if sampled else None)
        if prune_to is not None:  # rerank drawn nodes by value: lossy
            keep = best_nodes(Tree(tree.tokens, tree.parents, tree.scores), prune_to)
            index = [paths_of(tree.tokens, tree.parents).index(p)
                     for p in paths_of(keep.tokens, keep.parents)]
            tree = Tree(keep.tokens, keep.parents, keep.scores, tree.rows[index])
        probs = tree.rows
        if rows == "parent":  # a point-mass tree passed off as sampled
            probs = torch.stack([toy_probs(context + p[:-1], 1)
                                 for p in paths_of(tree.tokens, tree.parents)])
        elif rows == "none":  # sampled children checked with the point-mass rule
            probs = None
        draft = Draft(torch.tensor(tree.tokens, dtype=torch.long),
                      torch.tensor(tree.parents, dtype=torch.long), probs)
        return verify_rejection(draft, target_rows(context, tree.tokens, tree.parents), rng).tokens

    return step


def tv(**kw) -> float:
    return total_variation(sequence_distribution(lambda c: tree_step(c, **kw), HORIZON), TARGET)


@pytest.mark.parametrize("topk,depth,max_nodes", [(2, 2, 3), (2, 3, 4), (3, 2, 5), (1, 3, 3)])
def test_point_mass_rule_on_builder_trees_is_exact(topk, depth, max_nodes):
    assert tv(topk=topk, depth=depth, max_nodes=max_nodes) < 1e-9


@pytest.mark.parametrize("topk,depth,max_nodes", [(2, 2, 4), (2, 2, 3), (1, 3, 3)])
def test_recursive_rule_on_sampled_builder_trees_is_exact(topk, depth, max_nodes):
    assert tv(topk=topk, depth=depth, max_nodes=max_nodes, sampled=True) < 1e-9


@pytest.mark.parametrize("name,kw", [
    ("top-k-children-verified-as-sampled", dict(topk=2, depth=2, max_nodes=3, rows="parent")),
    ("sampled-children-verified-as-point-masses", dict(topk=2, depth=2, max_nodes=4, sampled=True,
                                                       rows="none")),
    ("sampled-nodes-reranked-by-value", dict(topk=2, depth=2, max_nodes=4, sampled=True,
                                             prune_to=2)),
])
def test_negative_controls_fail(name, kw):
    assert tv(**kw) > 0.01, name


# --- the draft model ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_tree_forward_matches_fresh_forwards(arch, monkeypatch):
    """Every row the drafter's tree forwards produce equals a fresh forward of the node's path."""
    model = tiny_model(arch, seed=2, layers=2)
    fresh = HFModel(model)
    seen = []

    def recording_build_tree(expand, **kw):
        def wrapped(frontier, tokens, parents):
            rows = expand(frontier, tokens, parents)
            seen.append((list(frontier), list(tokens), list(parents), rows))
            return rows
        return build_tree(wrapped, **kw)

    monkeypatch.setattr(draft_model, "build_tree", recording_build_tree)
    drafter = draft_model.DraftModelDrafter(HFModel(model), num_draft_tokens=3, tree="dynamic",
                                            topk=3, max_nodes=10)
    prompt = make_prompts(3)[2]
    for extra in ([], [7, 8]):  # a second proposal on top of a cache trimmed after the first
        tokens = prompt + extra
        ctx = DraftContext(tokens, len(prompt), 16, 8, SamplingParams(), 0)
        draft = drafter.propose(ctx)
        assert drafter.model.length == len(tokens)  # the tree nodes left the cache
        drafter.observe(sd.Verdict([], [1], len(draft)))
    assert len(seen) == 6
    for frontier, tokens, parents, rows in seen:
        paths = paths_of(tokens, parents)
        for node, row in zip(frontier, rows):
            context = prompt + (list(paths[node]) if node >= 0 else [])
            if len(seen) and frontier != [-1]:
                context = [t for t in context]
            fresh.reset()
            ids = (seen[0] and context)
            expected = torch.softmax(fresh.extend(ids)[-1], -1)
            del expected, row  # placeholder removed below
