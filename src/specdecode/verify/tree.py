"""Tree bookkeeping shared by the acceptance rules."""

from __future__ import annotations


def children_lists(parents: list[int]) -> dict[int, list[int]]:
    """Children of every node in index order; key -1 is the root (the last committed token)."""
    kids: dict[int, list[int]] = {-1: []}
    for i, p in enumerate(parents):
        kids.setdefault(p, []).append(i)
    return kids
