"""SpecTr's k-sequential rule for several independent drafts of the same position.

Sun, Suresh, Ro, Beirami, Jain, Yu, "SpecTr: Fast Speculative Decoding via Optimal Transport"
(NeurIPS 2023), the k-sequential selection. For k drafts X_1..X_k drawn independently from
draft_probs and a rho in [1, k], with beta = sum_x min(draft_probs(x), target_probs(x) / rho):

- try X_1, X_2, ... in turn, accepting X_i with probability
  min(1, target_probs(X_i) / (rho * draft_probs(X_i)));
- if none passes, draw from the residual
  target_probs(x) - min(draft_probs(x), target_probs(x) / rho) * (1 - (1 - beta)^k) / beta.

Valid (the residual is non-negative) iff rho * beta >= 1 - (1 - beta)^k: the left side grows with
rho and the right side shrinks, so the valid rhos form an interval [rho*, k] (rho = k always works)
and the smallest, the best, is found by bisection. k = 1 gives rho = 1: plain rejection sampling.
SpecTr is (1 - 1/e)-optimal among multi-draft rules (``optimal.py`` computes the optimum).

On a tree the rule runs level by level: at each node the children are the k drafts of the next
position; the accepted child's subtree is verified next. Children with different ``draft_probs``
rows (drawn without replacement, or from several drafters) are not i.i.d.: there the node falls
back to recursive rejection sampling (the SpecInfer / RRSw rule of ``verify_rejection``), which is
exact for any per-child rows and is the comparison path the tests run on the same drafts. A
point-mass draft (``draft_probs`` None) uses the point-mass rule of ``verify_rejection``.

The pure functions use only row arithmetic (``-``, ``*``, ``/``, ``row[x]``, ``.clamp(min=0)``,
``.minimum(row)``, ``.sum()``, ``.equal(row)``) so the tests run them on exact rational rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from specdecode.sampling import RandomSource
from specdecode.types import Draft, Verdict
from specdecode.verify.rejection import verify_rejection
from specdecode.verify.tree import Row, children_lists

BISECTION_STEPS = 30


def overlap(target_row: Row, draft_row: Row, rho: Any) -> Any:
    """beta(rho) = sum_x min(draft_probs(x), target_probs(x) / rho)."""
    return draft_row.minimum(target_row / rho).sum()


def is_valid_rho(target_row: Row, draft_row: Row, k: int, rho: Any) -> bool:
    beta = overlap(target_row, draft_row, rho)
    return bool(rho * beta >= 1 - (1 - beta) ** k)


def smallest_rho(target_row: Row, draft_row: Row, k: int, steps: int = BISECTION_STEPS) -> Any:
    """The smallest valid rho in [1, k], to within (k - 1) / 2^steps above it (always valid)."""
    if k <= 1 or is_valid_rho(target_row, draft_row, k, 1):
        return 1
    zero = target_row.sum() * 0  # bisect in the rows' own number type (exact rows stay exact)
    low, high = zero + 1, zero + k
    for _ in range(steps):
        mid = (low + high) / 2
        if is_valid_rho(target_row, draft_row, k, mid):
            high = mid
        else:
            low = mid
    return high


def k_sequential(target_row: Row, draft_row: Row, drafted: Sequence[int], rng: RandomSource,
                 rho: Any) -> tuple[int | None, Row | None]:
    """(index of the accepted draft, None) or (None, residual row to draw the next token from)."""
    k = len(drafted)
    for i, x in enumerate(drafted):
        dx = draft_row[x]
        if dx > 0 and rng.bernoulli(min(1, target_row[x] / (rho * dx))):
            return i, None
    accepted_part = draft_row.minimum(target_row / rho)
    beta = accepted_part.sum()
    if not beta > 0:
        return None, target_row
    residual = (target_row - accepted_part * ((1 - (1 - beta) ** k) / beta)).clamp(min=0)
    return None, residual if residual.sum() > 0 else target_row


def recursive_rejection(target_row: Row, draft_rows: Sequence[Row], drafted: Sequence[int],
                        rng: RandomSource) -> tuple[int | None, Row | None]:
    """Recursive rejection over siblings, each against the residual of the previous ones (SpecInfer;
    RRSw when the rows are without replacement). Same return as ``k_sequential``."""
    residual = target_row
    for i, (x, row) in enumerate(zip(drafted, draft_rows)):
        dx = row[x]
        if dx > 0 and rng.bernoulli(min(1, residual[x] / dx)):
            return i, None
        left = (residual - row).clamp(min=0)
        mass = left.sum()
        if mass > 0:
            residual = left / mass
    return None, residual


RhoRule = Callable[[Row, Row, int], Any]


def spectr_accept(tokens: Sequence[int], parents: Sequence[int], target_rows: Sequence[Row],
                  draft_rows: Sequence[Row], rng: RandomSource, *, rho: RhoRule = smallest_rho
                  ) -> tuple[list[int], int]:
    """(accepted path from the root, next token), level by level. ``rho(target_row, draft_row, k)``
    is replaceable for the tests (negative controls, cached bisection)."""
    kids = children_lists(list(parents))
    path: list[int] = []
    node = -1
    while True:
        children = kids.get(node, [])
        target_row = target_rows[node + 1]
        if not children:
            return path, rng.categorical(target_row)
        rows = [draft_rows[c] for c in children]
        drafted = [tokens[c] for c in children]
        if all(row is rows[0] or row.equal(rows[0]) for row in rows[1:]):
            chosen, residual = k_sequential(target_row, rows[0], drafted, rng,
                                            rho(target_row, rows[0], len(children)))
        else:
            chosen, residual = recursive_rejection(target_row, rows, drafted, rng)
        if chosen is None:
            return path, rng.categorical(residual)
        node = children[chosen]
        path.append(node)


def verify_spectr(draft: Draft, target_probs: torch.Tensor, rng: RandomSource) -> Verdict:
    """``target_probs`` [n + 1, V] as for ``verify_rejection``."""
    if draft.draft_probs is None or len(draft) == 0:
        return verify_rejection(draft, target_probs, rng)
    tokens = draft.tokens.tolist()
    path, nxt = spectr_accept(tokens, draft.parents.tolist(), target_probs, draft.draft_probs, rng)
    return Verdict(path=path, tokens=[tokens[i] for i in path] + [nxt], num_drafted=len(tokens))
