"""``heuristic``: transformers' assisted-generation schedule (``num_assistant_tokens_schedule=
"heuristic"``), as a peer: the draft depth k grows by 2 after a step whose deepest draft token was
accepted and shrinks by 1 (not below 1) otherwise. k starts at the depth of the first, unrestricted
draft; the node budget of tree drafters is left to the drafter."""

from __future__ import annotations

from typing import Any

from specdecode.drafters.options import count
from specdecode.policies.base import Budget, StepRecord, register_policy
from specdecode.types import Draft, SpecDecodeError


class HeuristicPolicy:
    def __init__(self, start: int | None = None) -> None:
        if start is not None and start < 1:
            raise SpecDecodeError(f"heuristic start must be >= 1, got {start}")
        self.k = start

    def plan(self, max_nodes: int, max_depth: int) -> Budget:
        return Budget(max_nodes, max_depth if self.k is None else min(self.k, max_depth))

    def select(self, draft: Draft) -> Draft:
        return draft

    def observe(self, record: StepRecord) -> None:
        if record.drafted == 0:
            return
        if self.k is None:
            self.k = record.depth
        if record.accepted >= record.depth:  # grows, but never far past what was asked
            self.k = min(self.k + 2, record.budget.depth + 2)
        else:
            self.k = max(1, self.k - 1)


@register_policy("heuristic", options={"start": count(1, "nodes", nullable=True)})
def build_heuristic(build: Any, start: int | None = None) -> HeuristicPolicy:
    return HeuristicPolicy(start)
