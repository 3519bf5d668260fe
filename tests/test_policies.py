"""Policies on synthetic costs and acceptances (no model): the adaptive policy drafts nothing when
drafting cannot pay, grows the budget when acceptance is high and verification cheap, follows a
change in acceptance within a few steps, and prunes scored drafts to prefix-closed sets. The
heuristic follows transformers' rule. Losslessness under every policy is tested in
test_greedy_equivalence.py and test_sampling.py."""

from __future__ import annotations

import random

import pytest
import torch

from specdecode.policies import Budget, StepRecord, make_policy
from specdecode.policies.adaptive import AdaptivePolicy
from specdecode.policies.cost import CostModel, interpolate
from specdecode.policies.heuristic import HeuristicPolicy
from specdecode.types import Draft, SpecDecodeError

FLAT = {0: 1.0, 1: 1.02, 2: 1.04, 4: 1.08, 8: 1.2, 16: 1.5, 32: 2.0, 64: 3.0}
STEEP = {0: 1.0, 1: 2.0, 2: 3.0, 4: 5.0, 8: 9.0, 16: 17.0, 64: 65.0}
MEDIUM = {n: 1.0 + 0.25 * n for n in (0, 1, 2, 4, 8, 16, 64)}
DRAFTER_DEPTH = 8


def simulate(policy, acceptance, steps: int, rng: random.Random, draft_cost: float = 0.01,
             curve=FLAT) -> list[tuple[Budget, int]]:
    """A chain drafter of depth <= 8 whose tokens are each accepted with ``acceptance(step)``;
    timings come from ``curve`` (the truth the policy must discover)."""
    out = []
    for step in range(steps):
        budget = policy.plan(64, 100)
        depth = 0 if budget.off else min(budget.depth, budget.nodes, DRAFTER_DEPTH)
        accepted = 0
        while accepted < depth and rng.random() < acceptance(step):
            accepted += 1
        policy.observe(StepRecord(budget, depth, depth, accepted, draft_cost * depth,
                                  interpolate(curve, depth), 0.0))
        out.append((budget, accepted))
    return out


def adaptive(curve=FLAT) -> AdaptivePolicy:
    return AdaptivePolicy(CostModel(curve))


@pytest.mark.parametrize("curve, acceptance", [(FLAT, 0.0), (STEEP, 0.5)])
def test_drafts_nothing_when_drafting_cannot_pay(curve, acceptance):
    """Nothing is ever accepted, or verifying costs a full step per node at 50% acceptance (a
    node then returns 0.5 token for the price of 1): off, apart from sparse probes."""
    steps = simulate(adaptive(curve), lambda s: acceptance, 300, random.Random(0), curve=curve)
    late = [b for b, _ in steps[50:]]
    off = sum(b.off for b in late) / len(late)
    assert off > 0.9, f"drafted on {1 - off:.0%} of the late steps"
    assert not all(b.off for b in late), "it must still probe now and then"


def test_budget_grows_when_acceptance_is_high_and_verification_cheap():
    steps = simulate(adaptive(), lambda s: 0.95, 60, random.Random(1))
    depths = [b.depth for b, _ in steps[20:] if not b.off]
    assert len(depths) == 40 and min(depths) >= DRAFTER_DEPTH - 1


def test_budget_stays_small_when_only_the_first_token_is_likely():
    """Moderate acceptance with a steeper curve: a short chain beats a long one."""
    curve = {0: 1.0, 1: 1.1, 2: 1.3, 4: 1.8, 8: 3.0, 64: 20.0}
    steps = simulate(adaptive(curve), lambda s: 0.6, 200, random.Random(2), curve=curve)
    depths = [b.depth for b, _ in steps[50:] if not b.off]
    assert depths and 1 <= sorted(depths)[len(depths) // 2] <= 3


def test_follows_a_change_in_acceptance_within_a_few_steps():
    """A node costs a quarter of a step: drafting pays at 95% acceptance, not at 0%."""
    rng = random.Random(3)
    phase = {"p": 0.95}
    policy = adaptive(MEDIUM)
    steps = simulate(policy, lambda s: phase["p"], 40, rng, curve=MEDIUM)
    assert not any(b.off for b, _ in steps[5:])
    phase["p"] = 0.0
    after_drop = simulate(policy, lambda s: phase["p"], 12, rng, curve=MEDIUM)
    first_off = next(i for i, (b, _) in enumerate(after_drop) if b.off)
    assert first_off <= 6, f"still drafting {first_off} steps after acceptance fell to 0"
    phase["p"] = 0.95
    back = simulate(policy, lambda s: phase["p"], 40, rng, curve=MEDIUM)
    first_on = next(i for i, (b, _) in enumerate(back) if not b.off)
    # probes come after 8 plain steps, then 16 after a failed one: one of them must find it
    assert first_on <= 8 + 16, "a probe must find that drafting pays again"
    assert sum(not b.off for b, _ in back[first_on:]) >= 0.8 * len(back[first_on:])


def test_select_keeps_prefix_closed_nodes_that_pay():
    # a root with two branches; scores fall along paths
    parents = torch.tensor([-1, 0, 1, -1, 3, 2, 5])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.3, 0.05, 0.6, 0.01])
    draft = Draft(torch.arange(7), parents, scores=scores)
    policy = adaptive({0: 1.0, 1: 1.05, 2: 1.1, 4: 1.2, 8: 1.4})
    kept = policy.select(draft)
    assert 0 < len(kept) < 7
    kept_tokens = set(kept.tokens.tolist())
    for node in kept_tokens:  # token i is node i here: every kept node's parent is kept
        parent = int(parents[node])
        assert parent < 0 or parent in kept_tokens
    assert 6 not in kept_tokens and 4 not in kept_tokens  # the worthless leaves go
    assert {0, 1, 2} <= kept_tokens  # the likely path stays
    # a sampled draft is never pruned (its nodes were drawn: dropping them by value is lossy)
    sampled = Draft(torch.arange(7), parents, torch.full((7, 7), 1 / 7), scores=scores)
    assert len(policy.select(sampled)) == 7
    # nothing pays when verification is very expensive: an empty draft (a plain step)
    assert len(adaptive(STEEP).select(Draft(torch.arange(2), torch.tensor([-1, -1]),
                                            scores=torch.tensor([0.1, 0.01])))) == 0


def test_select_keeps_ancestors_even_against_their_scores():
    draft = Draft(torch.arange(4), torch.tensor([-1, 0, 1, -1]),
                  scores=torch.tensor([0.1, 0.9, 0.9, 0.001]))
    kept = adaptive().select(draft)
    assert kept.tokens.tolist() == [0, 1, 2] and kept.parents.tolist() == [-1, 0, 1]


def test_select_leaves_chains_to_the_depth_model():
    chain = Draft(torch.arange(3), torch.tensor([-1, 0, 1]), scores=torch.tensor([0.5, 0.01, 1e-4]))
    assert len(adaptive(STEEP).select(chain)) == 3


def test_min_score_tells_a_scoring_drafter_what_pays():
    policy = adaptive()
    assert policy.plan(64, 8).min_score == 0.0  # nothing known about the drafter yet
    policy.observe(StepRecord(Budget(64, 8), 2, 2, 1, 0.01, 1.02, 0.0, True, 1.5))
    cheap = policy.plan(64, 8)
    policy_steep = adaptive(STEEP)
    policy_steep.observe(StepRecord(Budget(64, 8), 2, 2, 1, 0.01, 3.0, 0.0, True, 1.5))
    steep = policy_steep.plan(64, 8)
    assert 0.0 < cheap.min_score < 1.0
    assert steep.off or cheap.min_score < steep.min_score


def test_heuristic_follows_transformers_rule():
    policy = HeuristicPolicy()
    assert policy.plan(64, 100) == Budget(64, 100)  # first draft unrestricted
    policy.observe(StepRecord(Budget(64, 100), 4, 4, 4, 0, 0, 0))  # all accepted: 4 -> 6
    assert policy.plan(64, 100).depth == 6
    policy.observe(StepRecord(Budget(64, 6), 6, 6, 2, 0, 0, 0))  # not all: 6 -> 5
    assert policy.plan(64, 100).depth == 5
    for _ in range(10):
        policy.observe(StepRecord(Budget(64, 5), 5, 5, 0, 0, 0, 0))
    assert policy.plan(64, 100).depth == 1  # never below 1
    assert policy.plan(64, 0).depth == 0  # the engine's limit wins


def test_cost_curve_helpers():
    assert interpolate({0: 1.0, 4: 2.0}, 2) == pytest.approx(1.5)
    assert interpolate({0: 1.0, 4: 2.0}, 8) == pytest.approx(3.0)  # extended linearly
    model = CostModel({0: 1.0, 8: 2.0})
    for _ in range(50):
        model.observe(8, 4.0)  # everything is twice as slow as measured
    assert model(0) == pytest.approx(2.0, rel=0.05) and model(8) == pytest.approx(4.0, rel=0.05)
    for _ in range(50):
        model.observe(4, 1.5)  # 4 nodes turn out cheaper than the curve says: learnt for n = 4
    assert model(4) == pytest.approx(1.5, rel=0.05) and model(8) == pytest.approx(4.0, rel=0.3)
    with pytest.raises(SpecDecodeError):
        CostModel({1: 1.0})


def test_make_policy_errors_name_the_problem():
    with pytest.raises(SpecDecodeError, match="unknown policy 'greedy'"):
        make_policy("greedy", None)
    with pytest.raises(SpecDecodeError, match="no option"):
        make_policy("fixed", None, depth=3)
    with pytest.raises(SpecDecodeError, match="ema"):
        AdaptivePolicy(CostModel(FLAT), ema=0.0)


def test_draft_cost_fits_a_fixed_part_and_a_part_per_depth():
    from specdecode.policies.adaptive import DraftCost

    cost = DraftCost()
    cost.add(4, 9.0, provisional=True)  # a first draft that also fed the prompt: dropped later
    assert cost(4) == pytest.approx(9.0)
    for depth in [1, 2, 4, 1, 3, 2, 4, 1] * 3:
        cost.add(depth, 0.5 + 0.6 * depth)
    cost.add(2, 50.0, provisional=True)  # catching up after plain steps: ignored
    assert cost(1) == pytest.approx(1.1) and cost(8) == pytest.approx(5.3)


def test_adaptive_measures_its_curve_within_a_short_context():
    """A 256-position GPT-2: the cost curve is measured at a fixed context that fits (each
    measured step is rewound), so the adaptive policy runs and changes nothing."""
    from helpers import tiny_model, vanilla

    import specdecode

    model = tiny_model("gpt2", context=256)
    prompt = [5, 6, 7, 5, 6, 7, 5, 6]
    out = specdecode.generate(model, prompt, drafter="ngram", policy="adaptive",
                              max_new_tokens=24, eos_token_id=[])
    assert out.token_ids == vanilla(model, prompt, 24)
