"""Rejection sampling over chains and trees.

- Drafts with ``draft_probs``: accept token x with probability min(1, target_probs[x] /
  draft_probs[x]); on rejection the target distribution becomes the residual
  norm(max(0, target_probs - draft_probs)). Leviathan et al., "Fast Inference from Transformers via
  Speculative Decoding" (ICML 2023); Chen et al., "Accelerating Large Language Model Decoding with
  Speculative Sampling" (2023). Several siblings drawn *independently* from the same draft
  distribution are tried in turn, each against the residual left by the previous ones
  (recursive rejection sampling, SpecInfer: Miao et al., ASPLOS 2024).
- Deterministic drafts (``draft_probs is None``) are point masses: accept x with probability
  target_probs[x]; on rejection zero x in the target distribution and renormalise, then try the next
  sibling (the optimal rule for a deterministic proposal; see docs/DESIGN.md §4).
After a fully accepted path, or when every child of a node is rejected, one token is sampled from the
(residual) target distribution: the bonus or correction token.
"""

from __future__ import annotations

import torch

from specdecode.sampling import RandomSource
from specdecode.types import Draft, Verdict
from specdecode.verify.tree import children_lists


def verify_rejection(draft: Draft, target_probs: torch.Tensor, rng: RandomSource) -> Verdict:
    """``target_probs`` [n + 1, V]: processed target distribution after the context (row 0) and
    after each draft node (row i + 1)."""
    tokens = draft.tokens.tolist()
    kids = children_lists(draft.parents.tolist())
    draft_probs = draft.draft_probs
    path: list[int] = []
    node = -1
    probs = target_probs[0]
    while True:
        accepted = None
        for child in kids.get(node, ()):
            x = tokens[child]
            if draft_probs is None:
                if rng.bernoulli(float(probs[x])):
                    accepted = child
                    break
                probs = probs.clone()
                probs[x] = 0.0
            else:
                q = draft_probs[child]
                qx = float(q[x])
                ratio = min(1.0, float(probs[x]) / qx) if qx > 0 else 0.0
                if rng.bernoulli(ratio):
                    accepted = child
                    break
                residual = torch.clamp(probs - q, min=0.0)
                if float(residual.sum()) <= 0.0:
                    continue  # only reachable through rounding when probs == q; keep probs
                probs = residual
            total = float(probs.sum())
            if total <= 0.0:
                break
            probs = probs / total
        if accepted is None:
            bonus = rng.categorical(probs)
            return Verdict(path=path, tokens=[tokens[i] for i in path] + [bonus],
                           num_drafted=len(tokens))
        path.append(accepted)
        node = accepted
        probs = target_probs[node + 1]
