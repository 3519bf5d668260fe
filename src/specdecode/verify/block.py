"""Block verification of a sampled chain.

Sun, Mendlovic, Leviathan, Aharoni, Beirami, Ro, Suresh, "Block Verification Accelerates
Speculative Decoding" (ICLR 2025), Algorithm 2. For drafts x_1..x_k drawn from draft_probs:

- pi_0 = 1, pi_i = min(1, pi_{i-1} * target_probs_i(x_i) / draft_probs_i(x_i));
- for i < k, R_i = sum_x max(0, pi_i * target_probs_{i+1}(x) - draft_probs_{i+1}(x)) and
  h_i = R_i / (R_i + 1 - pi_i) (1 when the denominator is 0); h_k = pi_k;
- tau = the largest i with eta_i < h_i for independent uniforms eta_i (0 if none);
- emit x_1..x_tau, then a token from norm(max(0, pi_tau * target_probs_{tau+1} -
  draft_probs_{tau+1})), or the bonus token from target_probs_{k+1} when tau = k.

The whole block is judged at once: never worse than token-level rejection sampling, optimal among
rules that look only at the drafted path, and equal to it in distribution for point-mass drafts and
at temperature 0. Drawing the eta_i from i = k downwards and stopping at the first success gives the
same tau with fewer draws.

``block_accept`` is the pure rule on rows of numbers: it only uses row arithmetic (``-``, ``*`` and
``/`` by a scalar, ``row[x]``, ``.clamp(min=0)``, ``.sum()``), so the tests run it on exact rational
rows, and its randomness comes through the injectable ``RandomSource``. ``verify_block`` is the
engine's entry: a chain with ``draft_probs``. Other drafts fall back to the nearest exact rule,
recursive rejection sampling (``verify_rejection``): for point-mass drafts that rule is already the
optimal one (block verification reduces to it), and on trees block verification is not defined
(``traversal`` is its tree form).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from specdecode.sampling import RandomSource
from specdecode.types import Draft, Verdict
from specdecode.verify.rejection import verify_rejection
from specdecode.verify.tree import Row


def block_residual(pi: Any, target_row: Row, draft_row: Row) -> Row:
    """The correction distribution after accepting a prefix with weight ``pi`` (unnormalised)."""
    return (target_row * pi - draft_row).clamp(min=0)


def path_weights(tokens: Sequence[int], target_rows: Sequence[Row], draft_rows: Sequence[Row]
                 ) -> list[Any]:
    """pi_0..pi_k: pi_i = min(1, pi_{i-1} * target_probs_i(x_i) / draft_probs_i(x_i))."""
    weights: list[Any] = [1]
    for j, x in enumerate(tokens):
        dx = draft_rows[j][x]
        weights.append(min(1, weights[-1] * target_rows[j][x] / dx) if dx > 0 else 0)
    return weights


def block_accept(tokens: Sequence[int], target_rows: Sequence[Row], draft_rows: Sequence[Row],
                 rng: RandomSource, *,
                 correction: Callable[[Any, Row, Row], Row] = block_residual) -> tuple[int, int]:
    """(tau, next token) for the chain ``tokens`` [k]: ``target_rows`` [k + 1] are the target
    distributions after each prefix (row i after x_1..x_i), ``draft_rows`` [k] the distributions
    each x_{i+1} was drawn from. ``correction`` is replaceable only for the tests' negative
    controls."""
    k = len(tokens)
    pis = path_weights(tokens, target_rows, draft_rows)
    tau = 0
    for i in range(k, 0, -1):
        if i == k:
            h = pis[k]
        else:
            excess = block_residual(pis[i], target_rows[i], draft_rows[i]).sum()
            denominator = excess + 1 - pis[i]
            h = excess / denominator if denominator > 0 else 1
        if rng.bernoulli(h):
            tau = i
            break
    if tau == k:
        return tau, rng.categorical(target_rows[k])
    residual = correction(pis[tau], target_rows[tau], draft_rows[tau])
    if not residual.sum() > 0:  # only through float rounding: the exact rule never lands here
        residual = target_rows[tau]
    return tau, rng.categorical(residual)


def verify_block(draft: Draft, target_probs: torch.Tensor, rng: RandomSource) -> Verdict:
    """``target_probs`` [n + 1, V] as for ``verify_rejection``. Block verification for a chain with
    ``draft_probs``; recursive rejection sampling (its exact fallback) for anything else."""
    if draft.draft_probs is None or not draft.is_chain() or len(draft) == 0:
        return verify_rejection(draft, target_probs, rng)
    tokens = draft.tokens.tolist()
    tau, nxt = block_accept(tokens, target_probs, draft.draft_probs, rng)
    return Verdict(path=list(range(tau)), tokens=tokens[:tau] + [nxt], num_drafted=len(tokens))
