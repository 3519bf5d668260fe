"""Greedy and coupled acceptance: keep the longest draft path that matches the target's own choice.

Greedy chain verification is the rule of Leviathan et al., "Fast Inference from Transformers via
Speculative Decoding" (ICML 2023) at temperature 0; its tree form follows SpecInfer (Miao et al.,
ASPLOS 2024): descend from the root, at each node take the child whose token equals the target's
token there, stop when none does and emit the target's token as the bonus.

The same walk serves coupled sampling: there the target's choice at each row is the Gumbel-max of
its processed distribution under noise keyed by (seed, absolute position), a deterministic function,
so the output is exactly vanilla's keyed-noise output.
"""

from __future__ import annotations

import torch

from specdecode.types import Draft, Verdict
from specdecode.verify.tree import children_lists


def accept_matching(draft: Draft, target_choice: list[int]) -> Verdict:
    """``target_choice[0]`` is the target's token after the committed context, ``target_choice[i+1]``
    its token after draft node i. Among equal siblings the lowest index wins."""
    tokens = draft.tokens.tolist()
    kids = children_lists(draft.parents.tolist())
    path: list[int] = []
    node = -1
    while True:
        want = target_choice[node + 1]
        nxt = next((c for c in kids.get(node, ()) if tokens[c] == want), None)
        if nxt is None:
            return Verdict(path=path, tokens=[tokens[i] for i in path] + [want],
                           num_drafted=len(tokens))
        path.append(nxt)
        node = nxt


def verify_greedy(draft: Draft, target_logits: torch.Tensor) -> Verdict:
    """Greedy rule: the target's choice is the argmax of its logits ([n + 1, V])."""
    return accept_matching(draft, target_logits.argmax(-1).tolist())
