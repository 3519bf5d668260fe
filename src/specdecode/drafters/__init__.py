"""Drafters, one file per method, each registered by name with its needs and options in
``registry.REGISTRY``."""

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
from specdecode.drafters.base import BuildContext, DraftContext, Drafter
from specdecode.drafters.registry import (
    DEFAULT_DRAFTER,
    REGISTRY,
    DrafterSpec,
    Needs,
    available,
    check_options,
    drafters_needing,
    make_drafter,
    needs_of,
    register,
    self_contained,
    sources_of,
)

__all__ = ["DEFAULT_DRAFTER", "REGISTRY", "BuildContext", "DraftContext", "Drafter", "DrafterSpec",
           "Needs", "available", "check_options", "drafters_needing", "make_drafter", "needs_of",
           "register", "self_contained", "sources_of"]
