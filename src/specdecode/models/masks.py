"""Who sees what in a forward: tree masks over the cache, per-row reach matrices, causal masks,
sliding windows over key positions, and how a batch's rows are grouped so that no row reads the
longest row's slots (``plan_chunks``)."""

from __future__ import annotations

import torch

CHUNK_OVERHEAD_SLOTS = 256  # what one more attention call costs, in slots read (measured)


def tree_mask(parents: torch.Tensor, past: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, n+1, past+n+1]: row 0 is the pending token, row i+1 draft node i; each
    row sees the whole cache, the pending token, its ancestors and itself."""
    n = parents.numel()
    parent_of = torch.cat([torch.tensor([0]), parents + 1])  # row index of each row's parent
    step = torch.zeros(n + 1, n + 1)
    step[torch.arange(1, n + 1), parent_of[1:]] = 1.0
    reach = torch.eye(n + 1) + step  # ancestor-or-self, closed under squaring below
    hops = 1
    while hops < n:
        reach = ((reach @ reach) > 0).float()
        hops *= 2
    visible = torch.cat([torch.ones(n + 1, past), (reach > 0).float()], dim=1)
    mask = torch.zeros(n + 1, past + n + 1, dtype=dtype)
    mask.masked_fill_(visible == 0, torch.finfo(dtype).min)
    return mask[None, None]


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: attended) as the additive mask the model's attention takes: 0 where
    visible, the dtype's lowest value elsewhere."""
    mask = torch.zeros(visible.shape, dtype=dtype)
    return mask.masked_fill_(~visible, torch.finfo(dtype).min)


def causal_mask(past: int, q: int, dtype: torch.dtype, window: int | None = None
                ) -> torch.Tensor:
    """Additive mask [1, 1, q, past + q] of ``q`` new tokens after ``past`` cached ones (slot t
    holds position t): each sees the whole cache and the new tokens up to itself, or with
    ``window`` only the keys of its sliding window (``in_window``)."""
    keys, queries = torch.arange(past + q), past + torch.arange(q)
    visible = keys[None, :] <= queries[:, None]
    if window is not None:
        visible &= in_window(queries, keys, window)
    return additive_mask(visible, dtype)[None, None]


def in_window(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """bool [..., q, k]: whether the key at position t lies in the sliding window of ``window``
    tokens ending at the query's position p, i.e. p - window < t (transformers'
    ``sliding_window_overlay``; that t <= p is the causal mask's part). ``query_pos`` [..., q],
    ``key_pos`` [..., k]."""
    return key_pos[..., None, :] > query_pos[..., :, None] - window


def reach_matrix(parents: list[int], size: int) -> torch.Tensor:
    """[size, size] bool: row 0 is the pending token, row i+1 draft node i (``parents`` as in
    ``Draft``); each row reaches itself and its ancestors. Rows past the draft (padding) reach only
    themselves."""
    n = len(parents)
    if parents == list(range(-1, n - 1)):  # a chain: plain causal
        reach = torch.ones(n + 1, n + 1, dtype=torch.bool).tril_()
    else:
        reach = torch.eye(n + 1, dtype=torch.bool)
        for i, p in enumerate(parents):
            reach[i + 1] |= reach[p + 1]
    if size == n + 1:
        return reach
    out = torch.eye(size, dtype=torch.bool)
    out[:n + 1, :n + 1] = reach
    return out


def plan_chunks(need: list[int], overhead: int = CHUNK_OVERHEAD_SLOTS) -> list[tuple[int, int, int]]:
    """Split rows 0..b-1 into runs of consecutive rows minimising the slots read plus ``overhead``
    per run, where a run reads ``rows x its longest need`` (dynamic programming, O(b^2))."""
    b = len(need)
    best = [0.0] + [float("inf")] * b
    cut = [0] * (b + 1)
    for i in range(1, b + 1):
        longest = 0
        for j in range(i - 1, -1, -1):
            longest = max(longest, need[j])
            cost = best[j] + (i - j) * longest + overhead
            if cost < best[i]:
                best[i], cut[i] = cost, j
    chunks = []
    i = b
    while i > 0:
        j = cut[i]
        chunks.append((j, i, max(need[j:i])))
        i = j
    return chunks[::-1]
