"""L0 for traversal verification (verify/traversal.py): on a chain it is block verification (same
step distribution, hence the same acceptance); on sampled trees (children independent or without
replacement) it is exact over horizons of 2 x (depth + 1); it accepts at least as much as recursive
rejection on the same trees; the lossy parent update of a public re-implementation fails."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from helpers.exact_enumeration import (
    ExactRow,
    chain_parents,
    enumerate_step,
    expected_accepted,
    float_entry_gap,
    sequence_distribution,
    target_sequence_distribution,
    token_level,
    total_variation,
    toy_row,
    tree_step,
)
from helpers.rules import block_rule

from specdecode import Draft
from specdecode.sampling import TorchRandom
from specdecode.verify import verify_rejection
from specdecode.verify.traversal import traversal_accept, verify_traversal

SHAPES = {  # parents of the tree's nodes (children in drawing order)
    "two-drafts-depth-1": [-1, -1],
    "three-drafts-depth-1": [-1, -1, -1],
    "two-chains-depth-2": [-1, -1, 0, 1],
    "bushy-depth-2": [-1, -1, 0, 0],
    "delayed-expansion": [-1, 0, 0],  # a chain, then two children at depth 2
}


def depth_of(parents) -> int:
    depth = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return max(depth)


def lossy_update(weighted_target, child_draft, token):
    """A public re-implementation's parent update: min(1, R / (1 - ds(x)))."""
    surplus = (weighted_target - child_draft).clamp(min=0).sum()
    rest = 1 - child_draft[token]
    return min(1, surplus / rest) if rest > 0 else 1


def lossy_rule(tokens, parents, target_rows, draft_rows, rng):
    return traversal_accept(tokens, parents, target_rows, draft_rows, rng, update=lossy_update)


def exact_tv(rule, parents, vocab: int, replacement: bool) -> Fraction:
    horizon = 2 * (depth_of(parents) + 1)
    make_step = tree_step(rule, parents, vocab, replacement=replacement)
    return total_variation(sequence_distribution(make_step, horizon),
                           target_sequence_distribution(vocab, horizon))


@pytest.mark.parametrize("k,vocab", [(2, 3), (2, 4), (3, 3), (3, 5)])
def test_on_a_chain_traversal_is_block_verification(k, vocab):
    for context in [(), (0,), (1,), (2, 0)]:
        traversal = enumerate_step(tree_step(traversal_accept, chain_parents(k), vocab)(context))
        block = enumerate_step(tree_step(block_rule(), chain_parents(k), vocab)(context))
        assert traversal == block  # the joint law of (emitted tokens, accepted count)


def test_unit_vector_on_a_chain():
    target, draft = ExactRow([Fraction(1, 3), Fraction(2, 3)]), ExactRow([Fraction(2, 3), Fraction(1, 3)])

    def step(rng):
        tokens = [rng.categorical(draft) for _ in range(2)]
        path, nxt = traversal_accept(tokens, [-1, 0], [target] * 3, [draft] * 2, rng)
        return tuple(tokens[i] for i in path) + (nxt,), len(path)

    assert expected_accepted(lambda context: step) == Fraction(11, 9)


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.e2e
def test_traversal_is_exact_on_sampled_trees(shape, replacement):
    vocab = 4 if len(SHAPES[shape]) <= 2 else 3
    assert exact_tv(traversal_accept, SHAPES[shape], vocab, replacement) == 0


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.e2e
def test_traversal_accepts_at_least_recursive_rejection(replacement):
    gains = []
    for shape in SHAPES.values():
        for vocab in (3, 4):
            for context in [(), (2,)]:
                ours = expected_accepted(tree_step(traversal_accept, shape, vocab,
                                                   replacement=replacement), context)
                theirs = expected_accepted(tree_step(token_level, shape, vocab,
                                                     replacement=replacement), context)
                assert ours >= theirs, (shape, vocab, context)
                gains.append(ours - theirs)
    assert max(gains) > 0


@pytest.mark.e2e
def test_a_tree_accepts_at_least_block_on_its_spine():
    """Delayed expansion: extra children at depth 2 never lower the acceptance of the chain."""
    for vocab in (3, 4, 5):
        for context in [(), (0,), (1,)]:
            tree = expected_accepted(tree_step(traversal_accept, [-1, 0, 0, 0], vocab), context)
            spine = expected_accepted(tree_step(block_rule(), chain_parents(2), vocab), context)
            assert tree >= spine, (vocab, context)


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.e2e
def test_negative_control_lossy_parent_update_fails(replacement):
    assert exact_tv(lossy_rule, SHAPES["two-chains-depth-2"], 3, replacement) > Fraction(1, 1000)


def test_torch_entry_follows_the_pure_rule():
    """verify_traversal on float64 tensors gives the exact rule's step law (to rounding)."""
    assert float_entry_gap(verify_traversal, traversal_accept, [-1, -1, 0, 1], 4, (1,)) < 1e-12


def test_point_mass_trees_use_the_point_mass_rule():
    target = torch.softmax(torch.randn(4, 7, dtype=torch.float64), -1)
    draft = Draft(torch.tensor([1, 2, 3]), torch.tensor([-1, -1, 0]))
    for seed in range(20):
        assert verify_traversal(draft, target, TorchRandom(seed)) == \
            verify_rejection(draft, target, TorchRandom(seed))


def test_toy_rows_have_zeros():
    assert any(0 in toy_row((t,), 0, 4).values for t in range(4))


@pytest.mark.parametrize("rule_name", ["traversal", "recursive-rejection"])
@pytest.mark.e2e
def test_exact_when_the_shape_depends_on_the_drawn_tokens(rule_name):
    """As EAGLE-2's sampled dynamic tree: two children drawn at the root, then only the one with
    the higher draft probability (ties: the first) is expanded, with two children of its own."""
    vocab = 3
    rule = traversal_accept if rule_name == "traversal" else token_level

    def make_step(context):
        def step(rng):
            root = toy_row(context, 1, vocab)
            tokens = [rng.categorical(root), rng.categorical(root)]
            best = 0 if root[tokens[0]] >= root[tokens[1]] else 1
            below = toy_row(context + (tokens[best],), 1, vocab)
            tokens += [rng.categorical(below), rng.categorical(below)]
            parents, rows = [-1, -1, best, best], [root, root, below, below]
            paths = [(tokens[0],), (tokens[1],), (tokens[best], tokens[2]), (tokens[best], tokens[3])]
            targets = [toy_row(context, 0, vocab)] + [toy_row(context + p, 0, vocab) for p in paths]
            path, nxt = rule(tokens, parents, targets, rows, rng)
            return tuple(tokens[i] for i in path) + (nxt,), len(path)

        return step

    assert total_variation(sequence_distribution(make_step, 6),
                           target_sequence_distribution(vocab, 6)) == 0
