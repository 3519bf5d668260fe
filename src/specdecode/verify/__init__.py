"""Acceptance rules: pure functions of (draft, target scores, randomness) -> Verdict.

``verify`` picks the rule from ``SamplingParams`` (greedy at temperature 0, else ``RULES[mode]``).
Each sampling rule falls back to the nearest exact rule where it does not apply to the draft's
shape: point-mass drafts (``draft_probs`` None) always use the point-mass rule of
``verify_rejection`` (optimal for deterministic proposals); "block" on a tree uses recursive
rejection sampling; "spectr" uses recursive rejection at nodes whose children were not drawn
i.i.d. from one row. "traversal" applies to any sampled tree or chain.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdecode.sampling import RandomSource, coupled_choice, processed_probs
from specdecode.types import SAMPLING_MODES, Draft, SamplingParams, Verdict
from specdecode.verify.block import verify_block
from specdecode.verify.greedy import accept_matching, verify_greedy
from specdecode.verify.rejection import verify_rejection
from specdecode.verify.spectr import verify_spectr
from specdecode.verify.traversal import verify_traversal

# rule(draft, target_probs [n + 1, V], rng, seed, base_position) -> Verdict
Rule = Callable[[Draft, torch.Tensor, RandomSource, int, int], Verdict]


def _coupled(draft: Draft, probs: torch.Tensor, rng: RandomSource, seed: int,
             base_position: int) -> Verdict:
    depths = [0] + draft.depths().tolist() if len(draft) else [0]
    return accept_matching(draft, coupled_choice(probs, seed, [base_position + d for d in depths]))


RULES: dict[str, Rule] = {
    "rejection": lambda draft, probs, rng, seed, pos: verify_rejection(draft, probs, rng),
    "coupled": _coupled,
    "block": lambda draft, probs, rng, seed, pos: verify_block(draft, probs, rng),
    "traversal": lambda draft, probs, rng, seed, pos: verify_traversal(draft, probs, rng),
    "spectr": lambda draft, probs, rng, seed, pos: verify_spectr(draft, probs, rng),
}
if tuple(RULES) != SAMPLING_MODES:  # the modes SamplingParams accepts are this table's keys
    raise ImportError(f"verify.RULES {tuple(RULES)} differ from types.SAMPLING_MODES")


def verify(draft: Draft, logits: torch.Tensor, params: SamplingParams, rng: RandomSource,
           seed: int, base_position: int) -> Verdict:
    """Pick the rule the sampling parameters call for. ``logits`` [n + 1, V] come from one target
    forward over the pending token and the draft; ``base_position`` is the absolute position of the
    token that row 0 predicts (used by coupled sampling's keyed noise)."""
    if params.greedy:
        return verify_greedy(draft, logits)
    return RULES[params.mode](draft, processed_probs(logits, params), rng, seed, base_position)


__all__ = ["RULES", "SAMPLING_MODES", "accept_matching", "verify", "verify_block", "verify_greedy",
           "verify_rejection", "verify_spectr", "verify_traversal"]
