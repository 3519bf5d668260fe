"""Draft-budget policies, one file each, registered by name in ``base.POLICIES``."""

from specdecode.policies import adaptive, fixed, heuristic  # noqa: F401  (each registers itself)
from specdecode.policies.base import (
    POLICIES,
    Budget,
    Policy,
    PolicySpec,
    StepRecord,
    available_policies,
    check_policy,
    make_policy,
    register_policy,
)

__all__ = ["POLICIES", "Budget", "Policy", "PolicySpec", "StepRecord", "available_policies",
           "check_policy", "make_policy", "register_policy"]
