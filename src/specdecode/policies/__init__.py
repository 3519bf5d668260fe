"""Draft-budget policies, one file each, registered by name in ``base.POLICIES``."""

from specdecode.policies import adaptive, fixed, heuristic  # noqa: F401  (each registers itself)
from specdecode.policies.base import (
    POLICIES,
    Budget,
    Policy,
    StepRecord,
    available_policies,
    make_policy,
    register_policy,
)

__all__ = ["POLICIES", "Budget", "Policy", "StepRecord", "available_policies", "make_policy",
           "register_policy"]
