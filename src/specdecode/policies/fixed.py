"""``fixed``: every step drafts the drafter's full budget (the behaviour before policies)."""

from __future__ import annotations

from typing import Any

from specdecode.policies.base import Budget, StepRecord, register_policy
from specdecode.types import Draft


class FixedPolicy:
    def plan(self, max_nodes: int, max_depth: int) -> Budget:
        return Budget(max_nodes, max_depth)

    def select(self, draft: Draft) -> Draft:
        return draft

    def observe(self, record: StepRecord) -> None:
        pass


@register_policy("fixed", options={})
def build_fixed(build: Any) -> FixedPolicy:
    return FixedPolicy()
