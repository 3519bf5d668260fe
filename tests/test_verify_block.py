"""L0 for block verification (verify/block.py): exact enumeration with Fractions on toy
vocabularies (3-5 tokens, some probabilities 0) over horizons of 2 x (draft length + 1); the unit
vector of Sun et al.; block >= token-level acceptance on every toy case; negative controls."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from helpers.exact_enumeration import (
    ExactRow,
    chain_parents,
    enumerate_step,
    expected_accepted,
    sequence_distribution,
    target_sequence_distribution,
    token_level,
    total_variation,
    toy_row,
    tree_step,
)
from helpers.rules import block_rule, sampled_chain_step, tv_of

from specdecode import Draft
from specdecode.sampling import TorchRandom
from specdecode.verify import verify_rejection
from specdecode.verify.block import block_accept, verify_block


def exact_tv(rule, k: int, vocab: int) -> Fraction:
    horizon = 2 * (k + 1)
    make_step = tree_step(rule, chain_parents(k), vocab)
    return total_variation(sequence_distribution(make_step, horizon),
                           target_sequence_distribution(vocab, horizon))


def test_unit_vector_of_the_paper():
    """target (1/3, 2/3), draft (2/3, 1/3), k = 2: 10/9 accepted token-level, 11/9 block."""
    target, draft = ExactRow([Fraction(1, 3), Fraction(2, 3)]), ExactRow([Fraction(2, 3), Fraction(1, 3)])

    def make_step(rule):
        def step(rng):
            tokens = [rng.categorical(draft) for _ in range(2)]
            path, nxt = rule(tokens, [-1, 0], [target] * 3, [draft] * 2, rng)
            return tuple(tokens[i] for i in path) + (nxt,), len(path)

        return lambda context: step

    assert expected_accepted(make_step(token_level)) == Fraction(10, 9)
    assert expected_accepted(make_step(block_rule())) == Fraction(11, 9)


@pytest.mark.parametrize("k,vocab", [(1, 5), (2, 4), (2, 3), (3, 3)])
@pytest.mark.e2e
def test_block_is_exact(k, vocab):
    assert exact_tv(block_rule(), k, vocab) == 0


@pytest.mark.e2e
def test_block_is_exact_when_the_drafter_stops_on_what_it_drew():
    """A drafter may stop after a token it drew (here: one of draft probability < 1/3); the rule
    then judges the shorter block. Still exact."""
    vocab, k = 3, 3

    def make_step(context):
        def step(rng):
            tokens, rows = [], []
            while len(tokens) < k:
                row = toy_row(context + tuple(tokens), 1, vocab)
                tokens.append(rng.categorical(row))
                rows.append(row)
                if row[tokens[-1]] < Fraction(1, 3):
                    break
            targets = [toy_row(context + tuple(tokens[:i]), 0, vocab) for i in range(len(tokens) + 1)]
            tau, nxt = block_accept(tokens, targets, rows, rng)
            return tuple(tokens[:tau]) + (nxt,), tau

        return step

    horizon = 2 * (k + 1)
    assert total_variation(sequence_distribution(make_step, horizon),
                           target_sequence_distribution(vocab, horizon)) == 0


@pytest.mark.parametrize("vocab", [3, 4, 5])
def test_block_accepts_at_least_token_level_on_every_toy_case(vocab):
    gains = []
    for k in (2, 3):
        for context in [(), (0,), (1,), (2,), (1, 2)]:
            token = expected_accepted(tree_step(token_level, chain_parents(k), vocab), context)
            block = expected_accepted(tree_step(block_rule(), chain_parents(k), vocab), context)
            assert block >= token, (k, context)
            gains.append(block - token)
    assert max(gains) > 0  # and strictly more somewhere


def one_hot_chain_step(rule, vocab: int, k: int):
    """A deterministic chain (the draft's first likeliest token at each depth) as one-hot rows."""

    def make_step(context):
        def step(rng):
            tokens, rows = [], []
            for _ in range(k):
                row = toy_row(context + tuple(tokens), 1, vocab)
                tokens.append(max(range(vocab), key=lambda t: (row[t], -t)))
                rows.append(ExactRow([int(t == tokens[-1]) for t in range(vocab)]))
            targets = [toy_row(context + tuple(tokens[:i]), 0, vocab) for i in range(k + 1)]
            path, nxt = rule(tokens, chain_parents(k), targets, rows, rng)
            return tuple(tokens[i] for i in path) + (nxt,), len(path)

        return step

    return make_step


@pytest.mark.parametrize("context", [(), (0,), (2, 1)])
def test_point_mass_chain_block_equals_the_point_mass_rule(context):
    """On point masses block verification has the point-mass rule's output distribution."""
    block = enumerate_step(one_hot_chain_step(block_rule(), 4, 3)(context))
    token = enumerate_step(one_hot_chain_step(token_level, 4, 3)(context))
    assert block == token


def test_point_mass_drafts_use_the_point_mass_rule():
    target = torch.softmax(torch.randn(4, 7, dtype=torch.float64), -1)
    draft = Draft.chain([1, 2, 3])
    for seed in range(20):
        assert verify_block(draft, target, TorchRandom(seed)) == \
            verify_rejection(draft, target, TorchRandom(seed))


@pytest.mark.e2e  # about 3 s
def test_torch_entry_is_exact_on_the_float_harness():
    """verify_block on float64 tensors, enumerated by the float harness of test_acceptance_exact."""
    assert tv_of(lambda c: sampled_chain_step(c, rule=verify_block)) < 1e-9


NEGATIVE_CONTROLS = {
    "no residual correction (target after a rejection)": lambda pi, tp, dp: tp,
    "token-level residual (pi ignored)": lambda pi, tp, dp: (tp - dp).clamp(min=0),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE_CONTROLS))
@pytest.mark.e2e
def test_negative_control_fails(name):
    """Exact arithmetic: any TV above 0 is a real failure (measured: 0.28 without the residual
    correction, 0.0079 with the token-level residual)."""
    assert exact_tv(block_rule(NEGATIVE_CONTROLS[name]), 2, 4) > Fraction(1, 1000)
