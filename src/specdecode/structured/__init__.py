"""Structured output (docs/structured.md): a grammar is a change of the target's distribution.

At every verified node the target's logits are masked (-inf) with the grammar state of THAT node's
path, before any acceptance rule sees them; the rules (``verify/``) are exact for whatever
distribution the target gives at each node, so speculation stays lossless under the constraint.

- ``constraint.py``: ``parse_spec`` and ``compile_constraint`` -> ``Constraint`` (one compiled
  grammar over one tokenizer, kept in a bounded LRU).
- ``state.py``: ``ConstraintState``, one request's grammar state, the engine's hooks (shape the
  draft, mask the logits, advance along the emitted tokens).
- ``bounds.py``: what a constraint may cost, and the ``{"choice": [...]}`` constraint.
- ``cli.py``: the ``--json-schema | --regex | --grammar`` flags of ``generate`` and ``bench``.

llguidance is an optional dependency: ``pip install "specdecode[structured]"``.
"""

from specdecode.structured.constraint import (
    CACHE_SIZE,
    INSTALL,
    KINDS,
    Constraint,
    cache_info,
    compile_constraint,
    parse_spec,
)
from specdecode.structured.state import ConstraintState

__all__ = ["CACHE_SIZE", "INSTALL", "KINDS", "Constraint", "ConstraintState", "cache_info",
           "compile_constraint", "parse_spec"]
