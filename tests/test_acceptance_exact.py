"""L0: acceptance rules by exact enumeration on toy distributions (4 tokens, some probabilities 0,
horizon 2 x (draft length + 1)). Correct rules give total variation 0 (to float rounding) from the
target's own sequence distribution; every negative control must give a clearly positive TV."""

from __future__ import annotations

import pytest
import torch
from helpers.enumerate_rules import VOCAB, toy_probs
from helpers.rules import TARGET, sampled_chain_step, target_rows, tv_of

from specdecode import Draft
from specdecode.sampling import TorchRandom
from specdecode.verify import verify_rejection


def deterministic_tree_step(context, width=2, with_softmax=False):
    """Top-``width`` children of the draft at depth 1, then the argmax chain below the first."""

    def step(rng):
        q = toy_probs(context, 1)
        kids = torch.topk(q, width).indices.tolist()
        tokens, parents, rows = list(kids), [-1] * width, [q] * width
        q2 = toy_probs(context + (kids[0],), 1)
        tokens.append(int(q2.argmax()))
        parents.append(0)
        rows.append(q2)
        probs = torch.stack(rows) if with_softmax else None
        draft = Draft(torch.tensor(tokens), torch.tensor(parents), probs)
        return verify_rejection(draft, target_rows(context, tokens, parents), rng).tokens

    return step


def iid_siblings_step(context, width=2, without_replacement=False):
    """``width`` children sampled from the draft distribution (independently, or without
    replacement for the negative control), verified by recursive rejection."""

    def step(rng):
        q = toy_probs(context, 1)
        tokens, rows, left = [], [], q.clone()
        for _ in range(width):
            if without_replacement and float(left.sum()) <= 0:
                break
            tok = rng.categorical(left if without_replacement else q)
            tokens.append(tok)
            rows.append(q)
            if without_replacement:
                left[tok] = 0.0
        parents = [-1] * len(tokens)
        draft = Draft(torch.tensor(tokens), torch.tensor(parents), torch.stack(rows))
        return verify_rejection(draft, target_rows(context, tokens, parents), rng).tokens

    return step


def test_target_distribution_is_normalised():
    assert abs(sum(TARGET.values()) - 1.0) < 1e-12
    assert any((toy_probs((), 0) == 0).tolist()) or any(
        (toy_probs((t,), 0) == 0).any() for t in range(VOCAB))


@pytest.mark.parametrize("name,make_step", [
    ("rejection-chain", sampled_chain_step),
    ("point-mass-tree", deterministic_tree_step),
    ("point-mass-tree-width3", lambda c: deterministic_tree_step(c, width=3)),
    ("recursive-rejection-iid-siblings", iid_siblings_step),
])
def test_rule_is_exact(name, make_step):
    assert tv_of(make_step) < 1e-9


class AlwaysAccept:
    def __init__(self, rng):
        self.rng = rng

    def bernoulli(self, prob):
        return self.rng.bernoulli(1.0)

    def categorical(self, probs):
        return self.rng.categorical(probs)


def bonus_from_draft(draft, target_probs, rng):
    """Broken: the residual/bonus is drawn from the draft distribution instead of the target's."""
    return verify_rejection(draft, torch.cat([draft.draft_probs, draft.draft_probs[-1:]]), rng)


NEGATIVE_CONTROLS = {
    "accept-always": lambda c: sampled_chain_step(
        c, rule=lambda d, t, rng: verify_rejection(d, t, AlwaysAccept(rng))),
    "argmax-draft-checked-with-softmax": lambda c: deterministic_tree_step(c, with_softmax=True),
    "draft-verified-at-another-temperature": lambda c: sampled_chain_step(
        c, verify_probs=lambda ctx: torch.softmax(torch.log(toy_probs(ctx, 1) + 1e-12) / 2.0, -1)),
    "specinfer-rule-on-children-without-replacement": lambda c: iid_siblings_step(
        c, without_replacement=True),
    "bonus-from-the-draft": lambda c: sampled_chain_step(c, rule=bonus_from_draft),
}


@pytest.mark.parametrize("name", sorted(NEGATIVE_CONTROLS))
def test_negative_control_fails(name):
    assert tv_of(NEGATIVE_CONTROLS[name]) > 0.01


def test_bernoulli_never_accepts_probability_zero():
    rng = TorchRandom(0)
    assert not any(rng.bernoulli(0.0) for _ in range(20000))
    assert all(rng.bernoulli(1.0) for _ in range(2000))
