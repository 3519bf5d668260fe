"""What one forward runs (``ForwardPlan``): built by the adapter that owns the cache
(``BatchTarget``, ``HFModel``) for each call and passed explicitly all the way down: into the lean
forward or the model's own forward as the ``specdecode`` keyword, which transformers hands to each
layer's attention function (``models/attention.py``), and to the cache through ``CacheView``
(``models/slot_cache.py``). Nothing is set on the cache, the model or its config per call, and no
per-thread state is kept: two threads decoding with the same model never see each other's plan.

A plan says where the forward's tokens sit (positions, for sliding windows), which attention runs
(one of ``MASK``, ``CAUSAL``, ``CHUNKS``, ``EXACT``, ``SEGMENTS``), where the new keys go in a
``SlotCache`` and how many slots the attention reads. The attention records, per layer, the window
it was given (``windows``), so the adapter can check after the forward that every layer's
attention ran through the plan and with the window its config declares.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specdecode.models.masks import in_window

MASK = "mask"  # the model's attention with the additive mask it was given
CAUSAL = "causal"  # a fresh row's prefill: plain causal (sdpa skips the blocks above the diagonal)
CHUNKS = "chunks"  # per group of consecutive rows, each reading up to its longest row's slots
EXACT = "exact"  # the batch-invariant attention of models/exact.py, per ``exact`` (exact_plan)
SEGMENTS = "segments"  # several rows' prefills in one forward, each row's attention alone


@dataclass(eq=False)
class ForwardPlan:
    """One forward's settings beyond its inputs (see the module docstring).

    ``query_pos`` [b, q]: each token's position. ``key_pos`` [b, kv_len]: the position of the key
    in each cache slot the attention reads (None: slot t holds position t). ``attention``: which
    attention runs, with ``chunks`` (first row, end row, slots) for ``CHUNKS``, ``exact`` (from
    ``exact_plan``) for ``EXACT``, ``segments`` (row, cached length, offset of its tokens in the
    forward, their count) for ``SEGMENTS``. ``rows``, ``start`` / ``index``, ``kv_len``: for a
    ``SlotCache``, the rows this forward covers (a slice: a view), where their new entries go (one
    contiguous run from slot ``start``, else ``index`` [b, q] slots) and the prefix of slots the
    attention reads. ``memo``: what the attention computes once per forward (masks, indices).
    ``windows``: layer index -> the sliding window its attention was given (None: full)."""

    query_pos: torch.Tensor
    key_pos: torch.Tensor | None = None
    attention: str = MASK
    chunks: list[tuple[int, int, int]] = field(default_factory=list)
    exact: list | None = None
    segments: list[tuple[int, int, int, int]] | None = None
    rows: slice = field(default_factory=lambda: slice(0, 1))
    start: int | None = 0
    index: torch.Tensor | None = None
    kv_len: int = 0
    memo: dict = field(default_factory=dict)
    windows: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.last = int(self.query_pos.max()) if self.query_pos.numel() else 0

    def binding(self, window: int | None) -> int | None:
        """``window`` where it hides a key from some query of this forward (a query at position p
        reaches back to key 0, p tokens away), else None."""
        return window if window is not None and 0 < window <= self.last else None

    def window_mask(self, mask: torch.Tensor | None, window: int, q: int, kv: int,
                    dtype: torch.dtype, device) -> torch.Tensor:
        """The additive ``mask`` [b or 1, 1, q, kv] (None: plain causal by positions) with every
        key outside its query's sliding ``window`` hidden; made once per forward and window."""
        memo_key = ("window", window, None if mask is None else id(mask))
        if memo_key not in self.memo:
            queries = self.query_pos[:, -q:]
            keys = self.key_pos[:, :kv] if self.key_pos is not None else \
                torch.arange(kv)[None].expand(queries.shape[0], kv)
            visible = in_window(queries, keys, window)
            if mask is None:
                visible &= keys[:, None, :] <= queries[:, :, None]
                mask = torch.zeros((), dtype=dtype)
            visible = visible[:, None].to(device)
            mask = mask.to(device)
            if mask.dtype == torch.bool:  # transformers' own sdpa masks: True where attended
                self.memo[memo_key] = mask & visible
            else:
                self.memo[memo_key] = torch.where(visible, mask, torch.finfo(mask.dtype).min)
        return self.memo[memo_key]
