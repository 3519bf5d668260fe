"""Who sees what in a verification forward: tree masks over the cache, per-row reach matrices,
and the attention that runs a batch's rows in groups so no row reads the longest row's slots."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


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


def causal_mask(past: int, q: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, q, past + q] of ``q`` new tokens after ``past`` cached ones: each sees
    the whole cache and the new tokens up to itself."""
    visible = torch.arange(past + q)[None, :] <= (past + torch.arange(q))[:, None]
    return additive_mask(visible, dtype)[None, None]


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


# Rows of a batch whose lengths differ a lot should not all read the longest row's slots: during a
# ``BatchTarget`` forward the attention runs per group of consecutive rows, each group reading only
# up to its own longest row (``_FORWARD.chunks``; a view, never a copy). ``_FORWARD.causal``: a
# fresh row's prefill, plain causal attention (sdpa skips the blocks above the diagonal; the mask
# the model was given says the same, at full cost). Per thread: targets in other threads (a server's
# engine next to the caller's own decoding) never see each other's plan.
ROWS_ATTENTION = "specdecode_rows"
EXACT_ATTENTION = "specdecode_exact"
SEGMENTS_ATTENTION = "specdecode_segments"
_FORWARD = threading.local()
CHUNK_OVERHEAD_SLOTS = 256  # what one more attention call costs, in slots read (measured)


def _rows_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """sdpa over each chunk (first row, end row, slots) of ``_FORWARD.chunks``; plain sdpa
    without."""
    chunks = getattr(_FORWARD, "chunks", ())
    if getattr(_FORWARD, "causal", False):
        kwargs["is_causal"] = True
        return sdpa_attention_forward(module, query, key, value, None, *args, **kwargs)
    if len(chunks) <= 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    outs = []
    for r0, r1, slots in chunks:
        mask = None if attention_mask is None else attention_mask[r0:r1, ..., :slots]
        out, _ = sdpa_attention_forward(module, query[r0:r1], key[r0:r1, :, :slots],
                                        value[r0:r1, :, :slots], mask, *args, **kwargs)
        outs.append(out)
    return torch.cat(outs, 0), None


AttentionInterface.register(ROWS_ATTENTION, _rows_attention)


def _segments_attention(module, query, key, value, attention_mask, *args, **kwargs):
    """Prefills of several rows in one forward (``_FORWARD.segments``: row, cached length, offset
    of its tokens in the forward, their count). Each row's queries attend over its own slots
    exactly as its prefill alone would: plain causal sdpa on an empty row (``_FORWARD.causal``: the
    model's attention is sdpa), else the model's attention with the additive mask
    ``BatchTarget.prefill`` gives. ``key`` / ``value`` are the whole cache buffers."""
    outs = []
    for row, past, offset, q in _FORWARD.segments:
        part = query[:, :, offset:offset + q]
        keys, values = key[row:row + 1, :, :past + q], value[row:row + 1, :, :past + q]
        if past == 0 and q > 1 and _FORWARD.causal:
            out, _ = sdpa_attention_forward(module, part, keys, values, None, *args,
                                            is_causal=True, **kwargs)
        else:
            if ("mask", past, q) not in _FORWARD.memo:
                _FORWARD.memo["mask", past, q] = causal_mask(past, q, query.dtype).to(query.device)
            out, _ = _FORWARD.inner(module, part, keys, values, _FORWARD.memo["mask", past, q],
                                    *args, **kwargs)
        outs.append(out)
    return torch.cat(outs, 1), None


AttentionInterface.register(SEGMENTS_ATTENTION, _segments_attention)


@contextmanager
def rows_attention(config, chunks: list[tuple[int, int, int]] | None, causal: bool,
                   exact: list | None = None, segments: list | None = None, inner=None):
    """For one forward of a model whose attention is sdpa: run it per row group (``chunks``, when
    there are several), plainly causal (``causal``, a fresh row's prefill), per token (``exact``:
    the plan ``_exact_attention`` reads) or per row prefill (``segments``, with ``inner`` the
    model's own attention function). The model's config is switched only inside the block and
    restored after: the user's model is left as it was."""
    original = config._attn_implementation_internal
    switch = exact is not None or segments is not None or (
        (causal or (bool(chunks) and len(chunks) > 1)) and original == "sdpa")
    if not switch:
        yield
        return
    _FORWARD.chunks, _FORWARD.causal, _FORWARD.exact = chunks or [], causal, exact
    _FORWARD.segments, _FORWARD.inner = segments, inner
    _FORWARD.memo = {}  # what the exact attention computes once per forward
    config._attn_implementation_internal = SEGMENTS_ATTENTION if segments is not None else \
        EXACT_ATTENTION if exact is not None else ROWS_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation_internal = original
        _FORWARD.chunks, _FORWARD.causal, _FORWARD.exact = [], False, None
        _FORWARD.segments, _FORWARD.inner = None, None


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
