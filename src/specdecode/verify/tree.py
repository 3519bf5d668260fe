"""Tree bookkeeping shared by the acceptance rules."""

from __future__ import annotations

from typing import Any

# A distribution row as the pure rules see it: a [V] torch tensor, or any object with the same
# arithmetic (``-``, ``*`` and ``/`` by a scalar, ``row[x]``, ``.clamp(min=0)``, ``.minimum(row)``,
# ``.sum()``, ``.equal(row)``), such as the tests' exact rational rows.
Row = Any


def children_lists(parents: list[int]) -> dict[int, list[int]]:
    """Children of every node in index order; key -1 is the root (the last committed token)."""
    kids: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
    return kids
