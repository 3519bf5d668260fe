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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from specdecode.drafters.options import Limits, Option, check_table, declare
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


@dataclass(frozen=True)
class PolicySpec:
    """One registered policy: its factory and its options (type, default, bounds), like a
    drafter's (``drafters/registry.py``)."""

    name: str
    factory: Callable[..., Policy]
    options: Mapping[str, Option] = field(default_factory=dict)


POLICIES: dict[str, PolicySpec] = {}


def register_policy(name: str, *, options: Mapping[str, Option] | None = None
                    ) -> Callable[[Callable], Callable]:
    """Register ``factory(build: BuildContext, **options) -> Policy`` under ``name`` with its
    options (defaults read from the factory)."""

    def wrap(factory: Callable) -> Callable:
        POLICIES[name] = PolicySpec(name, factory, declare(factory, options or {},
                                                           f"policy {name!r}"))
        return factory

    return wrap


def available_policies() -> list[str]:
    return sorted(POLICIES)


def check_policy(name: Any) -> str:
    """``name`` if it is a registered policy, else ``SpecDecodeError`` listing them."""
    if not isinstance(name, str) or name not in POLICIES:
        raise SpecDecodeError(f"unknown policy {str(name)[:64]!r}; available: "
                              f"{', '.join(available_policies())}")
    return name


def make_policy(name: str, build: Any, limits: Limits | None = None, **options: Any) -> Policy:
    """A fresh policy for one request; bad names, options and values raise ``SpecDecodeError``."""
    spec = POLICIES[check_policy(name)]
    checked, unknown = check_table(f"policy {name}", spec.options, options, limits or Limits())
    if unknown:
        raise SpecDecodeError(f"policy {name!r} has no option(s) {', '.join(unknown)}; "
                              f"its options: {', '.join(spec.options) or 'none'}")
    return spec.factory(build, **checked)
