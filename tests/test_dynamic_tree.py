"""EAGLE-2 dynamic draft trees: the builder's invariants on toy distributions, the acceptance rules
on builder trees by exact enumeration (TESTING.md L0), the draft model's incremental tree forward
against fresh forwards, and greedy / coupled identity with vanilla decoding."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from helpers import ARCHS, make_prompts, tiny_model, vanilla
from helpers import fixed_policy as sd
from helpers.enumerate_rules import (
    sequence_distribution,
    target_sequence_distribution,
    total_variation,
    toy_probs,
)

import specdecode.drafters.draft_model as draft_model
import specdecode.drafters.model_drafting as model_drafting
from specdecode import Draft
from specdecode.drafters.base import DraftContext
from specdecode.drafters.dynamic_tree import Tree, best_nodes, build_tree
from specdecode.drafters.model_drafting import DraftModelDrafter
from specdecode.models import HFModel
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


class AcceptAll:
    """A broken rule's randomness: every acceptance test passes."""

    def __init__(self, rng) -> None:
        self.rng = rng

    def bernoulli(self, prob: float) -> bool:
        return self.rng.bernoulli(1.0)

    def categorical(self, probs: torch.Tensor) -> int:
        return self.rng.categorical(probs)


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
        draft = Draft(torch.tensor(tree.tokens, dtype=torch.long),
                      torch.tensor(tree.parents, dtype=torch.long), probs)
        judge = AcceptAll(rng) if rows == "accept-all" else rng  # no ratio: always accepted
        return verify_rejection(draft, target_rows(context, tree.tokens, tree.parents),
                                judge).tokens

    return step


def tv(**kw) -> float:
    return total_variation(sequence_distribution(lambda c: tree_step(c, **kw), HORIZON), TARGET)


@pytest.mark.parametrize("topk,depth,max_nodes", [(2, 2, 3), (2, 3, 4), (3, 2, 5), (1, 3, 3)])
def test_point_mass_rule_on_builder_trees_is_exact(topk, depth, max_nodes):
    assert tv(topk=topk, depth=depth, max_nodes=max_nodes) < 1e-9


@pytest.mark.parametrize("topk,depth,max_nodes", [(2, 2, 4), (2, 2, 3), (1, 3, 3)])
@pytest.mark.e2e
def test_recursive_rule_on_sampled_builder_trees_is_exact(topk, depth, max_nodes):
    assert tv(topk=topk, depth=depth, max_nodes=max_nodes, sampled=True) < 1e-9


@pytest.mark.parametrize("name,kw", [
    ("top-k-children-verified-as-sampled", dict(topk=2, depth=2, max_nodes=3, rows="parent")),
    ("sampled-children-accepted-without-the-ratio", dict(topk=2, depth=2, max_nodes=4,
                                                         sampled=True, rows="accept-all")),
    ("sampled-nodes-reranked-by-value", dict(topk=2, depth=2, max_nodes=4, sampled=True,
                                             prune_to=2)),
])
@pytest.mark.e2e
def test_negative_controls_fail(name, kw):
    assert tv(**kw) > 0.01, name


# --- the draft model ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_tree_forward_matches_fresh_forwards(arch, monkeypatch):
    """Every row of the drafter's incremental tree forwards equals a fresh forward of the node's
    whole path, also on a second proposal over the cache trimmed after the first."""
    model = tiny_model(arch, seed=2, layers=2)
    fresh = HFModel(model)
    seen = []

    def recording_build_tree(expand, **kw):
        def wrapped(frontier, tokens, parents):
            rows = expand(frontier, tokens, parents)
            seen.append((context, list(frontier), paths_of(tokens, parents), rows))
            return rows
        return build_tree(wrapped, **kw)

    monkeypatch.setattr(model_drafting, "build_tree", recording_build_tree)
    drafter = DraftModelDrafter(HFModel(model), num_draft_tokens=3, tree="dynamic", topk=3,
                                max_nodes=10)
    prompt = make_prompts(3)[2]
    for context in (prompt, prompt + [7, 8]):
        draft = drafter.propose(DraftContext(context, len(prompt), 16, 8, SamplingParams(), 0))
        assert len(draft) == 10 and drafter.model.length == len(context)  # tree nodes cropped
        drafter.observe(sd.Verdict([0], [int(draft.tokens[0]), 7], len(draft)))
    assert len(seen) == 6 and sum(len(f) for _, f, _, _ in seen) == 2 * (1 + 3 + 3)
    for context, frontier, paths, rows in seen:
        for node, row in zip(frontier, rows):
            fresh.reset()
            ids = context + (list(paths[node]) if node >= 0 else [])
            expected = torch.softmax(fresh.extend(ids)[-1], -1)
            torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)


def greedy_cases():
    return [dict(), dict(max_nodes=1), dict(max_nodes=2), dict(topk=2, num_draft_tokens=6,
                                                                max_nodes=16)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.e2e
def test_greedy_dynamic_tree_matches_vanilla(arch):
    target, other = tiny_model(arch, seed=0), tiny_model(arch, seed=1, layers=1)
    for i, prompt in enumerate(make_prompts(4, seed=3)):
        reference = vanilla(target, prompt, 16)
        for options in greedy_cases():
            common = dict(drafter="draft-model", tree="dynamic", max_new_tokens=16,
                          eos_token_id=[], policy="fixed", **options)
            out = sd.generate(target, prompt, draft_model=target, **common)
            assert out.token_ids == reference, (i, options)
            assert out.stats.accepted > 0
            if options.get("max_nodes", 12) <= 2:
                assert max(s.drafted for s in out.steps) <= options["max_nodes"]
        out = sd.generate(target, prompt, draft_model=other, **common)
        assert out.token_ids == reference
    # small budgets from the request: max_draft_nodes caps the tree too
    out = sd.generate(target, prompt, drafter="draft-model", draft_model=target, tree="dynamic",
                      max_new_tokens=16, eos_token_id=[], policy="fixed", max_draft_nodes=2)
    assert out.token_ids == reference and max(s.drafted for s in out.steps) <= 2


def test_coupled_sampling_with_a_dynamic_tree_is_identical_to_vanilla():
    target = tiny_model("qwen2", seed=5)
    for seed, prompt in enumerate(make_prompts(4)):
        common = dict(max_new_tokens=16, seed=seed, sampling="coupled", eos_token_id=[],
                      temperature=1.0, policy="fixed")
        reference = sd.generate(target, prompt, drafter="none", **common).token_ids
        out = sd.generate(target, prompt, drafter="draft-model", draft_model=target,
                          tree="dynamic", **common)
        assert out.token_ids == reference and out.stats.accepted > 0


def test_rejection_sampling_draws_children_from_the_processed_draft():
    """Under rejection sampling the tree's nodes are drawn, and each carries exactly the processed
    draft distribution after its parent's path."""
    model = tiny_model("llama", seed=2, layers=2)
    fresh = HFModel(model)
    params = SamplingParams(temperature=0.8, top_k=20)
    drafter = DraftModelDrafter(HFModel(model), num_draft_tokens=3, tree="dynamic", topk=2,
                                max_nodes=5)
    prompt = make_prompts(3)[1]
    draft = drafter.propose(DraftContext(prompt, len(prompt), 16, 8, params, 7))
    assert len(draft) == 5 and draft.draft_probs is not None
    for path, row in zip(paths_of(draft.tokens.tolist(), draft.parents.tolist()), draft.draft_probs):
        fresh.reset()
        expected = processed_probs(fresh.extend(prompt + list(path[:-1]))[-1], params)
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
    out = sd.generate(model, prompt, drafter="draft-model", draft_model=model, tree="dynamic",
                      max_new_tokens=12, eos_token_id=[], temperature=0.8, top_k=20, seed=1,
                      policy="fixed")
    assert len(out.token_ids) == 12 and out.stats.accepted > 0


def test_chain_scores_and_min_score():
    model = tiny_model("llama", seed=2, layers=2)
    prompt = make_prompts(3)[1]
    fresh = HFModel(model)
    drafter = DraftModelDrafter(HFModel(model), num_draft_tokens=4)
    draft = drafter.propose(DraftContext(prompt, len(prompt), 16, 8, SamplingParams(), 0))
    tokens, score, expected = draft.tokens.tolist(), 1.0, []
    for i, tok in enumerate(tokens):
        fresh.reset()
        score *= float(torch.softmax(fresh.extend(prompt + tokens[:i])[-1], -1)[tok])
        expected.append(score)
    assert len(tokens) == 4
    torch.testing.assert_close(draft.scores, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    drafter.observe(sd.Verdict([], [tokens[0] + 1], 4))
    # a sampled chain stops right *after* the first token scoring below min_score
    cut = expected[1] * 0.999
    ctx = DraftContext(prompt + [tokens[0] + 1], len(prompt), 16, 8,
                       SamplingParams(temperature=1.0), 3, min_score=cut)
    draft = drafter.propose(ctx)
    assert draft.draft_probs is not None
    below = [i for i, s in enumerate(draft.scores.tolist()) if s < cut]
    assert below and below[0] == len(draft) - 1


def test_options_and_errors():
    params = inspect.signature(draft_model.build_draft_model).parameters
    assert params["tree"].default == "chain" and params["topk"].default == 4
    assert params["max_nodes"].default == 12
    model = HFModel(tiny_model("llama", layers=1))
    with pytest.raises(SpecDecodeError, match="tree_width"):
        DraftModelDrafter(model, tree="dynamic", tree_width=2)
    with pytest.raises(SpecDecodeError, match="chain, dynamic"):
        DraftModelDrafter(model, tree="bush")
    with pytest.raises(SpecDecodeError):
        DraftModelDrafter(model, tree="dynamic", topk=0)
