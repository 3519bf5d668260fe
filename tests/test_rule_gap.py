"""The offline grader's full-vocabulary formulas (bench/rule_gap.py) against the enumerated optimum
of verify/optimal.py on small vocabularies."""

from __future__ import annotations

import random

import torch

from specdecode.bench.rule_gap import optimal_acceptance, recursive_acceptance, spectr_acceptance
from specdecode.verify.optimal import optimal_acceptance as enumerated


def test_vectorised_optimum_and_rules_below_it():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(150):
        vocab = rng.randint(3, 9)
        target = torch.softmax(torch.randn(vocab, generator=gen) * 2, 0).double()
        draft = torch.softmax(torch.randn(vocab, generator=gen) * 2, 0).double()
        for n in (1, 2, 3):
            best = optimal_acceptance(target, draft, n)
            assert abs(best - float(enumerated(target.tolist(), draft.tolist(), n))) < 1e-5
            assert recursive_acceptance(target, draft, n) <= best + 1e-6
            assert spectr_acceptance(target, draft, n) <= best + 1e-6
            if n == 1:  # one draft: every rule reaches the optimum, sum min(target, draft)
                assert abs(recursive_acceptance(target, draft, 1) - best) < 1e-6
