"""Acceptance rules and step harnesses that several L0 tests share: the float harness's sampled
chain on the toy distributions of ``enumerate_rules`` (test_acceptance_exact.py,
test_verify_block.py), and block and SpecTr verification as pure rules for the exact, Fraction
harness of ``exact_enumeration`` (test_verify_*.py, tests/acceptance_table.py)."""

from __future__ import annotations

from fractions import Fraction
from functools import cache

import torch

from helpers.enumerate_rules import (
    sequence_distribution,
    target_sequence_distribution,
    total_variation,
    toy_probs,
)
from helpers.exact_enumeration import ExactRow
from specdecode import Draft
from specdecode.verify import verify_rejection
from specdecode.verify.block import block_accept, block_residual
from specdecode.verify.spectr import smallest_rho, spectr_accept

GAMMA = 2
HORIZON = 2 * (GAMMA + 1)
TARGET = target_sequence_distribution(HORIZON)


def target_rows(context, tokens, parents):
    """Target probabilities after the context (row 0) and after each node (row i + 1)."""
    rows, paths = [toy_probs(context, 0)], []
    for tok, par in zip(tokens, parents):
        prefix = paths[par] if par >= 0 else ()
        paths.append(prefix + (tok,))
        rows.append(toy_probs(context + paths[-1], 0))
    return torch.stack(rows)


def sampled_chain_step(context, rule=verify_rejection, draft_salt=1, verify_probs=None):
    """Draft GAMMA tokens by sampling the toy draft distribution, verify with ``rule``."""

    def step(rng):
        tokens, rows = [], []
        for _ in range(GAMMA):
            q = toy_probs(context + tuple(tokens), draft_salt)
            tokens.append(rng.categorical(q))
            rows.append(q if verify_probs is None else verify_probs(context + tuple(tokens[:-1])))
        parents = list(range(-1, GAMMA - 1))
        draft = Draft.chain(tokens, torch.stack(rows))
        return rule(draft, target_rows(context, tokens, parents), rng).tokens

    return step


def tv_of(make_step) -> float:
    return total_variation(sequence_distribution(make_step, HORIZON), TARGET)


def block_rule(correction=block_residual):
    def rule(tokens, parents, target_rows, draft_rows, rng):
        tau, nxt = block_accept(tokens, target_rows, draft_rows, rng, correction=correction)
        return list(range(tau)), nxt

    return rule


@cache
def cached_rho(target_values: tuple, draft_values: tuple, k: int) -> Fraction:
    return smallest_rho(ExactRow(target_values), ExactRow(draft_values), k, steps=16)


def spectr_rule(rho=None):
    def rule(tokens, parents, target_rows, draft_rows, rng):
        chosen = rho or (lambda t, d, k: cached_rho(t.values, d.values, k))
        return spectr_accept(tokens, parents, target_rows, draft_rows, rng, rho=chosen)

    return rule
