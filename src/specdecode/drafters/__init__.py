"""Drafters, one file per method, each registered by name in ``base.REGISTRY``."""

from specdecode.drafters import (  # noqa: F401  (each module registers its drafter)
    draft_model,
    eagle,
    grammar,
    layer_skip,
    lookahead,
    medusa,
    mix,
    ngram,
    none,
    oracle,
    rest,
    sam,
    suffix,
    token_recycling,
)
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
