"""The policy extension point: how much to draft each step. One Protocol, one registry.

A policy serves one request (like a drafter). Before each draft ``plan`` returns a ``Budget``
(0 nodes = a plain decoding step: the drafter is not called that step and catches up from
``ctx.tokens`` at its next proposal); after drafting ``select`` may keep only the nodes of a scored,
deterministic draft that pay; after verification ``observe`` gets the step's ``StepRecord``.

Lossless by construction: every decision is taken from information available before the tokens it
concerns are drawn or verified. ``select`` prunes only point-mass drafts (``draft_probs is None``),
whose nodes are a deterministic function of the context, so any subset verifies exactly; a sampled
draft is never pruned for the values it drew (that would bias the proposal). The acceptance rules
decide what is emitted, whatever the budget.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from specdecode.types import Draft, SpecDecodeError


@dataclass(frozen=True)
class Budget:
    """What the next draft may use: ``nodes`` (0 = plain step), ``depth``, and ``min_score``, the
    score below which a scoring drafter need not expand a node (see ``DraftContext``)."""

    nodes: int
    depth: int
    min_score: float = 0.0

    @property
    def off(self) -> bool:
        return self.nodes <= 0 or self.depth <= 0


@dataclass
class StepRecord:
    """One verified step as a policy sees it. ``depth`` is the verified draft's depth, ``accepted``
    the accepted draft tokens (the path length), ``tree`` whether the draft branched; ``score_sum``
    the sum of the kept nodes' ``Draft.scores`` (None for unscored drafts); ``proposed`` and
    ``proposed_depth`` describe the draft before ``select`` cut it. ``verify_s`` is the whole
    forward's time, which verified ``batch_size`` requests' drafts together, ``batch_tokens`` tokens
    in all (rows x the longest row, padding included)."""

    budget: Budget
    drafted: int
    depth: int
    accepted: int
    draft_s: float
    verify_s: float
    other_s: float
    tree: bool = False
    score_sum: float | None = None
    proposed: int = -1  # nodes the drafter proposed before ``select`` (-1: as drafted)
    proposed_depth: int = 0
    batch_size: int = 1
    batch_tokens: int = 0  # 0: drafted + 1 (a batch of one)


@runtime_checkable
class Policy(Protocol):
    def plan(self, max_nodes: int, max_depth: int) -> Budget: ...

    def select(self, draft: Draft) -> Draft: ...

    def observe(self, record: StepRecord) -> None: ...


Factory = Callable[..., Policy]
POLICIES: dict[str, Factory] = {}


def register_policy(name: str) -> Callable[[Factory], Factory]:
    """Register ``factory(build: BuildContext, **options) -> Policy`` under ``name``."""

    def wrap(factory: Factory) -> Factory:
        POLICIES[name] = factory
        return factory

    return wrap


def available_policies() -> list[str]:
    return sorted(POLICIES)


def make_policy(name: str, build: Any, **options: Any) -> Policy:
    """A fresh policy for one request; bad names and options raise ``SpecDecodeError``."""
    if name not in POLICIES:
        raise SpecDecodeError(f"unknown policy {name!r}; available: "
                              f"{', '.join(available_policies())}")
    factory = POLICIES[name]
    params = [p for p in inspect.signature(factory).parameters if p != "build"]
    unknown = [k for k in options if k not in params]
    if unknown:
        raise SpecDecodeError(f"policy {name!r} has no option(s) {', '.join(unknown)}; "
                              f"its options: {', '.join(params) or 'none'}")
    return factory(build, **options)
