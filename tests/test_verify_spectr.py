"""L0 for SpecTr's k-sequential rule (verify/spectr.py) and the optimal multi-draft grader
(verify/optimal.py): exact enumeration with Fractions; SpecTr with rho below its bound fails; no
rule accepts the first token more often than alpha*, which drawing without replacement raises."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from helpers.exact_enumeration import (
    ExactRow,
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
from helpers.rules import spectr_rule

from specdecode.verify.optimal import MAX_ENUMERATED, cut_value, optimal_acceptance, threshold_sets
from specdecode.verify.spectr import is_valid_rho, smallest_rho, verify_spectr
from specdecode.verify.traversal import traversal_accept


def exact_tv(rule, parents, vocab: int, replacement: bool = True) -> Fraction:
    depth = [1]
    for p in parents[1:]:
        depth.append(1 if p < 0 else depth[p] + 1)
    horizon = 2 * (max(depth) + 1)
    make_step = tree_step(rule, parents, vocab, replacement=replacement)
    return total_variation(sequence_distribution(make_step, horizon),
                           target_sequence_distribution(vocab, horizon))


@pytest.mark.parametrize("parents,vocab", [
    ([-1], 5), ([-1, -1], 4), ([-1, -1, -1], 4), ([-1, -1, -1], 3), ([-1, -1, 0, 0], 3)])
@pytest.mark.e2e
def test_spectr_is_exact(parents, vocab):
    assert exact_tv(spectr_rule(), parents, vocab) == 0


@pytest.mark.e2e  # about 3 s
def test_spectr_without_replacement_falls_back_to_an_exact_rule():
    assert exact_tv(spectr_rule(), [-1, -1, 0, 0], 3, replacement=False) == 0


def test_smallest_rho_is_valid_and_tight():
    for context in [(), (0,), (1,), (2,), (3,)]:
        target, draft = toy_row(context, 0, 5), toy_row(context, 1, 5)
        for k in (2, 3):
            rho = smallest_rho(target, draft, k, steps=20)
            assert 1 <= rho <= k and is_valid_rho(target, draft, k, rho)
            if rho > 1:
                assert not is_valid_rho(target, draft, k, rho - Fraction(2 * (k - 1), 2 ** 20))


def test_negative_control_rho_below_its_bound_fails():
    """rho = 1 with 3 drafts is below the bound wherever the rows differ: the residual would be
    negative, is clipped, and the output distribution moves."""
    assert exact_tv(spectr_rule(rho=lambda t, d, k: 1), [-1, -1, -1], 4) > Fraction(1, 1000)


@pytest.mark.e2e
def test_torch_entry_follows_the_pure_rule():
    rule = spectr_rule(rho=smallest_rho)  # the engine's bisection depth
    for parents, replacement in [([-1, -1, -1], True), ([-1, -1, 0, 0], True), ([-1, -1], False)]:
        gap = float_entry_gap(verify_spectr, rule, parents, 4, (1,), replacement=replacement)
        assert gap < 1e-12


def first_accepted(rule, parents, vocab, context, replacement) -> Fraction:
    """Pr(the first drafted position is accepted) for one step."""
    dist = enumerate_step(tree_step(rule, parents, vocab, replacement=replacement)(context))
    return sum((p for (_, accepted), p in dist.items() if accepted > 0), Fraction(0))


@pytest.mark.parametrize("replacement", [True, False], ids=["iid", "without-replacement"])
@pytest.mark.e2e
def test_no_rule_beats_the_optimal_acceptance(replacement):
    rules = {"recursive-rejection": token_level, "traversal": traversal_accept,
             "spectr": spectr_rule()}
    for n in (1, 2, 3):
        for vocab in (3, 4, 5):
            for context in [(), (1,), (2,)]:
                target, draft = toy_row(context, 0, vocab), toy_row(context, 1, vocab)
                best = optimal_acceptance(target, draft, n, replacement=replacement)
                for name, rule in rules.items():
                    got = first_accepted(rule, [-1] * n, vocab, context, replacement)
                    assert got <= best, (name, n, vocab, context)
                    if n == 1:
                        assert got == best  # one draft: rejection sampling is optimal (1 - TV)


def test_optimal_acceptance_known_values():
    target, draft = [Fraction(1, 3), Fraction(2, 3)], [Fraction(2, 3), Fraction(1, 3)]
    assert optimal_acceptance(target, draft, 1) == Fraction(2, 3)  # 1 - TV
    # two drafts with replacement: S = {1} gives 1 - 2/3 + 1 - (2/3)^2 = 8/9
    assert optimal_acceptance(target, draft, 2) == Fraction(8, 9)
    # without replacement the two drafts are both tokens whenever possible: always a hit
    assert optimal_acceptance(target, draft, 2, replacement=False) == 1


def test_without_replacement_never_lowers_the_optimum_and_thresholds_suffice():
    rng = random.Random(7)
    for _ in range(60):
        vocab = rng.randint(2, 7)
        target = ExactRow([rng.choice((0, 1, 2, 5)) for _ in range(vocab)])
        draft = ExactRow([rng.choice((0, 1, 3, 4)) for _ in range(vocab)])
        if not (target.sum() > 0 and draft.sum() > 0):
            continue
        target, draft = target / target.sum(), draft / draft.sum()
        for n in (1, 2, 3):
            iid = optimal_acceptance(target, draft, n)
            assert optimal_acceptance(target, draft, n, replacement=False) >= iid
            assert min(cut_value(target.tolist(), draft.tolist(), s, n, True)
                       for s in threshold_sets(target.tolist(), draft.tolist())) == iid
    assert MAX_ENUMERATED >= 7


def test_spectr_and_recursive_rejection_on_the_same_drafts():
    """The comparison path: both exact on the same i.i.d. drafts; neither dominates the other in
    general, both stay below alpha* (above); here we only pin that both gain over one draft."""
    for vocab in (3, 4, 5):
        one = expected_accepted(tree_step(token_level, [-1], vocab))
        for n in (2, 3):
            spectr = expected_accepted(tree_step(spectr_rule(), [-1] * n, vocab))
            rrs = expected_accepted(tree_step(token_level, [-1] * n, vocab))
            assert spectr >= one and rrs >= one
