"""The library with the fixed policy (the drafter's full budget every step) wherever a call names
no policy: ``generate``, ``stream``, ``prepare``, ``generate_batch`` and ``Scheduler``; every other
name is the library's own.

Tests of drafters, acceptance rules, batching and forwards check that drafts flow and are verified
exactly; the library's default policy (adaptive) rightly drafts little on tiny random models, so
those test modules ask for this one: ``from helpers import fixed_policy as sd``. Tests of the
policies name theirs (``policy=...``), which wins here too.
"""

from __future__ import annotations

from typing import Any

import specdecode

POLICY = "fixed"


def _fixed(options: dict[str, Any]) -> dict[str, Any]:
    return {"policy": POLICY, **options}


def generate(model, input_ids, **options: Any):
    return specdecode.generate(model, input_ids, **_fixed(options))


def stream(model, input_ids, **options: Any):
    return specdecode.stream(model, input_ids, **_fixed(options))


def prepare(model, input_ids, **options: Any):
    return specdecode.prepare(model, input_ids, **_fixed(options))


def generate_batch(model, prompts, **options: Any):
    return specdecode.generate_batch(model, prompts, **_fixed(options))


def Scheduler(model, **options: Any) -> specdecode.Scheduler:
    """A scheduler whose requests default to the fixed policy (``add_request`` may name another)."""
    return specdecode.Scheduler(model, **_fixed(options))


def __getattr__(name: str) -> Any:
    return getattr(specdecode, name)
