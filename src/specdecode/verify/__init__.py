"""Acceptance rules: pure functions of (draft, target scores, randomness) -> Verdict."""

from __future__ import annotations

import torch

from specdecode.sampling import RandomSource, coupled_choice, processed_probs
from specdecode.types import Draft, SamplingParams, Verdict
from specdecode.verify.greedy import accept_matching, verify_greedy
from specdecode.verify.rejection import verify_rejection


def verify(draft: Draft, logits: torch.Tensor, params: SamplingParams, rng: RandomSource,
           seed: int, base_position: int) -> Verdict:
    """Pick the rule the sampling parameters call for. ``logits`` [n + 1, V] come from one target
    forward over the pending token and the draft; ``base_position`` is the absolute position of the
    token that row 0 predicts (used by coupled sampling's keyed noise)."""
    if params.greedy:
        return verify_greedy(draft, logits)
    probs = processed_probs(logits, params)
    if params.mode == "coupled":
        depths = [0] + draft.depths().tolist() if len(draft) else [0]
        return accept_matching(draft, coupled_choice(probs, seed, [base_position + d for d in depths]))
    return verify_rejection(draft, probs, rng)


__all__ = ["accept_matching", "verify", "verify_greedy", "verify_rejection"]
