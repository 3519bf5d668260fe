"""Drafters, one file per method, each registered by name in ``base.REGISTRY``."""

from specdecode.drafters import draft_model, layer_skip, mix, ngram, none, oracle  # noqa: F401  (register)
from specdecode.drafters.base import (
    REGISTRY,
    BuildContext,
    DraftContext,
    Drafter,
    available,
    make_drafter,
    register,
)

__all__ = ["REGISTRY", "BuildContext", "DraftContext", "Drafter", "available", "make_drafter",
           "register"]
