"""Offline grader: the optimal acceptance probability of any multi-draft rule at one position.

Hu, Zheng, et al., "Towards Optimal Multi-draft Speculative Decoding" (ICLR 2025). With n drafts
of one position drawn from draft_probs (independently, or without replacement) and the target
distribution target_probs, the best probability that a lossless rule emits one of the drafts is an
optimal-transport value whose dual is

    alpha* = min over token sets S of [1 - target_probs(S) + Pr(some draft lies in S)]

(S = {} and S = V both give 1). With replacement Pr = 1 - (1 - draft_probs(S))^n; without
replacement it is 1 - Pr(every draft lies outside S), summed over the ordered draws. Every exact rule
(recursive rejection, SpecTr, traversal's first level) accepts the first token with probability at
most alpha*: the tests grade our rules with it. Drawing without replacement raises alpha*.

Exact for the numbers it is given (pass ``fractions.Fraction`` for exact values): every subset is
enumerated for vocabularies of at most ``MAX_ENUMERATED`` tokens; above that (with replacement
only) the minimum is taken over the threshold sets {tokens with the highest target/draft ratios},
which the tests check against the full enumeration on small vocabularies. Not for the engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

MAX_ENUMERATED = 12


def _numbers(row: Any) -> list[Any]:
    return row.tolist() if hasattr(row, "tolist") else list(row)


def prob_all_outside(draft_probs: Sequence[Any], outside: set[int], num_drafts: int,
                     replacement: bool) -> Any:
    """Pr(every one of the ``num_drafts`` drafts lies in ``outside``)."""
    if replacement:
        return sum(draft_probs[x] for x in outside) ** num_drafts
    if num_drafts == 0:
        return 1
    total = sum(draft_probs)
    if not total > 0:
        return 1  # nothing left to draw: the drafter stops
    out = 0 * total
    for x in outside:
        if draft_probs[x] > 0:
            rest = [0 * total if i == x else p for i, p in enumerate(draft_probs)]
            out += draft_probs[x] / total * prob_all_outside(rest, outside, num_drafts - 1, False)
    return out


def cut_value(target_probs: Sequence[Any], draft_probs: Sequence[Any], subset: set[int],
              num_drafts: int, replacement: bool) -> Any:
    """1 - target_probs(S) + Pr(some draft in S)."""
    outside = set(range(len(target_probs))) - subset
    hit = 1 - prob_all_outside(draft_probs, outside, num_drafts, replacement)
    return 1 - sum(target_probs[x] for x in subset) + hit


def optimal_acceptance(target_probs: Any, draft_probs: Any, num_drafts: int, *,
                       replacement: bool = True) -> Any:
    """alpha* for ``num_drafts`` drafts from ``draft_probs`` (rows: lists or 1-D tensors)."""
    tp, dp = _numbers(target_probs), _numbers(draft_probs)
    vocab = len(tp)
    if vocab <= MAX_ENUMERATED:
        sets = (set(c) for size in range(vocab + 1) for c in combinations(range(vocab), size))
    elif replacement:
        sets = threshold_sets(tp, dp)
    else:
        raise ValueError(f"without replacement alpha* is enumerated only for vocabularies of at "
                         f"most {MAX_ENUMERATED} tokens, got {vocab}")
    return min(cut_value(tp, dp, s, num_drafts, replacement) for s in sets)


def threshold_sets(target_probs: Sequence[Any], draft_probs: Sequence[Any]) -> list[set[int]]:
    """{}, then the tokens added one by one by decreasing target/draft ratio (draft 0 first)."""
    def key(x: int) -> tuple[int, Any]:
        d = draft_probs[x]
        return (0, -target_probs[x]) if d == 0 else (1, -(target_probs[x] / d))

    order = sorted(range(len(target_probs)), key=key)
    return [set(order[:size]) for size in range(len(order) + 1)]
