"""The engine's target (``BatchTarget``, the ``TargetModel`` protocol it fills) and ``warm_up``.

One invariant: a request's cache holds its committed tokens except the last one (the *pending*
token), so one step is exactly one forward over ``[pending] + draft`` with a tree mask, after
which ``keep(path)`` leaves the pending token and the accepted path in the cache, in order.
``BatchTarget`` keeps a preallocated cache of many rows (``SlotCache``), one per running request,
each at its own offset; a step runs every row together; nothing is concatenated or copied per
step. Each forward is planned (``models/plan.py``): the plan travels with the call, through the
lean forward (``models/lean.py``, Llama-family models) or the model's own.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Protocol

import torch

from specdecode.models.adopt import Adapter
from specdecode.models.exact import MIN_ROWS, ExactMatmul, block_end, default_exact, exact_plan
from specdecode.models.lean import LeanForward, feature_layers, own_features
from specdecode.models.masks import additive_mask, causal_mask, plan_chunks, reach_matrix
from specdecode.models.packed import packed_linears
from specdecode.models.plan import CAUSAL, CHUNKS, EXACT, MASK, SEGMENTS, ForwardPlan
from specdecode.models.slot_cache import SlotCache
from specdecode.types import Draft

PREFILL_TOKENS = 4096  # tokens of joining requests prefilled in one forward, at most


class TargetModel(Protocol):
    """What the engine needs from a target: rows (one per running request) with their own caches,
    a prefill per row, one forward for every row's draft, and ``keep`` per row. Asked with
    ``hidden=True``, ``prefill`` and ``step`` leave the target's features (last hidden states, the
    LM head's input) of what they ran in ``hidden``, for feature-level drafters; asked with a tuple
    of layer indices, the outputs of those decoder layers (-1: the final-normed states),
    concatenated (EAGLE-3's low, middle and high layers)."""

    vocab_size: int
    max_length: int | None
    lengths: list[int]
    hidden: Any

    def reserve(self, rows: int, length: int) -> None: ...

    def add_row(self, need: int) -> int: ...

    def remove_row(self, row: int) -> int | None: ...

    def prefill(self, row: int, ids: list[int], last_only: bool = False,
                hidden: bool | tuple = False) -> torch.Tensor: ...

    def prefill_rows(self, rows: list[int], ids: list[list[int]], last_only: list[bool],
                     hidden: bool | tuple = False) -> list[torch.Tensor]: ...

    def step(self, roots: list[int], drafts: list[Draft], hidden: bool | tuple = False
             ) -> list[torch.Tensor]: ...

    def keep(self, row: int, path: list[int]) -> None: ...


class BatchTarget(Adapter):
    """The engine's target: a causal LM and a ``SlotCache`` with one row per running request.

    ``prefill(row, ids)`` feeds one row's prompt; ``step(roots, drafts)`` runs one forward over every
    row, row r's input being its pending token and its own draft (chain or tree), padded to the
    longest with masked dummy nodes; ``keep(row, path)`` then moves the accepted path's entries
    next to the pending token (nothing moves for a chain) and advances the row's length: the
    rejected nodes' slots are simply overwritten later. Each row sees exactly its own keys: its
    committed slots plus its own tree ancestors, whatever the other rows hold; padding is never
    inferred from token values. ``remove_row`` frees a row at once (the last row moves into its
    place, so the batch stays a prefix of the buffer and every forward reads a view)."""

    def __init__(self, model, exact: bool | None = None) -> None:
        super().__init__(model)
        self.exact = default_exact(self.dtype) if exact is None else bool(exact)
        # the lean forward (models/lean.py) packs its own weights; otherwise the model's linears
        self.packed = None if LeanForward.build(model) else packed_linears(model)
        layers = getattr(model.config, "num_hidden_layers", None)
        self.cache = SlotCache(int(layers), self.device, self.dtype)
        self.lengths: list[int] = []
        self.before: list[int] = []  # row lengths when the last ``step`` began
        self.hidden = None  # features of the last prefill / step that asked for them

    def reserve(self, rows: int, length: int) -> None:
        """Room for ``rows`` rows of ``length`` slots (allocated once, grown only when short)."""
        self.cache.reserve(rows, length)

    def add_row(self, need: int) -> int:
        """A new empty row with room for ``need`` slots; returns its index (the last)."""
        self.lengths.append(0)
        self.cache.reserve(len(self.lengths), need)
        return len(self.lengths) - 1

    def remove_row(self, row: int) -> int | None:
        """Free ``row``. The last row moves into it: returns that row's old index (None if ``row``
        was the last)."""
        last = len(self.lengths) - 1
        if row != last:
            n = self.lengths[last]
            self.cache.move(last, row, slice(0, n), slice(0, n))
            self.lengths[row] = n
        self.lengths.pop()
        return last if row != last else None

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, plan: ForwardPlan, mask: torch.Tensor,
                 last_only: bool = False, hidden: bool | tuple = False,
                 select: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, q, V]; with ``select`` (indices into the b * q tokens) [1, n, V] of only
        those (the lean forward reads out just them)."""
        extra = {"logits_to_keep": 1} if last_only and self.can_slice_logits else {}
        lean = LeanForward.build(self.model)  # models/lean.py, where the model allows
        # exact float32 runs MKL's matmuls row by row, except where they are oneDNN's packed ones
        # (the AVX2 path, models/cpu.py): those give each row the same result at any row count
        row_by_row = plan.attention == EXACT and self.dtype == torch.float32 and not (
            lean.pack if lean is not None else self.packed is not None)
        mode = ExactMatmul() if row_by_row else \
            self.packed or nullcontext()  # packed linears on the CPU: models/packed.py
        ids, positions = ids.to(self.device), plan.query_pos.to(self.device)
        with mode:
            if lean is not None:
                logits, self.hidden = lean(ids, positions, mask.to(self.device),
                                           self.cache.view(plan), plan, last_only, hidden,
                                           select=select, compiled=not row_by_row)
            else:
                layers = feature_layers(hidden)
                out = self.model(input_ids=ids, position_ids=positions,
                                 attention_mask=mask.to(self.device), use_cache=True,
                                 output_hidden_states=bool(layers), specdecode=plan,
                                 **{self.cache_arg: self.cache.view(plan)}, **extra)
                self.hidden = own_features(out.hidden_states, layers) if layers else None
                logits = out.logits.float()
                if select is not None:
                    logits = logits.view(-1, logits.shape[-1]).index_select(0, select)[None]
        self.checked(plan)
        return logits

    def prefill(self, row: int, ids: list[int], last_only: bool = False,
                hidden: bool | tuple = False) -> torch.Tensor:
        """Causal forward of ``ids`` after row ``row``'s cached tokens; logits [len(ids), V] (with
        ``last_only``, at least the last row). With ``hidden``, ``self.hidden`` is then the
        target's features (last hidden states) of every id, [len(ids), H]."""
        past, q = self.lengths[row], len(ids)
        self.cache.reserve(len(self.lengths), past + q)
        fresh = past == 0 and q > 1  # plainly causal: sdpa skips the blocks above the diagonal
        plan = ForwardPlan(query_pos=torch.arange(past, past + q)[None], rows=slice(row, row + 1),
                           start=past, kv_len=past + q, attention=CAUSAL if fresh else MASK)
        logits = self._forward(torch.tensor([ids]), plan, causal_mask(past, q, self.dtype),
                               last_only, hidden=hidden)
        if hidden:
            self.hidden = self.hidden[0]
        self.lengths[row] = past + q
        return logits[0]

    def prefill_rows(self, rows: list[int], ids: list[list[int]], last_only: list[bool],
                     hidden: bool | tuple = False) -> list[torch.Tensor]:
        """``prefill`` of several rows (requests joining together), in one forward where that
        gives each row exactly its own prefill's values: the lean forward on oneDNN's packed
        half-precision matmuls, whose result for a token does not depend on how many tokens
        share the call (measured: tests/test_lean.py). Each row's attention runs alone, as in
        its own prefill. Else one prefill per row. With ``hidden``, ``self.hidden`` is then a list
        of each row's features. Rows are grouped up to ``PREFILL_TOKENS`` tokens per forward."""
        lean = LeanForward.build(self.model)
        together = lean is not None and lean.pack
        groups: list[list[int]] = []
        size = 0  # tokens in the last group
        for i, run in enumerate(ids):
            if together and groups and size + len(run) <= PREFILL_TOKENS:
                groups[-1].append(i)
                size += len(run)
            else:
                groups.append([i])
                size = len(run)
        out, features = [], []
        for group in groups:
            if len(group) == 1:
                i = group[0]
                out.append(self.prefill(rows[i], ids[i], last_only[i], hidden))
                features.append(self.hidden)
            else:
                out += self._prefill_together(lean, [rows[i] for i in group],
                                              [ids[i] for i in group],
                                              [last_only[i] for i in group], hidden)
                features += self.hidden or []
        self.hidden = features if hidden else None
        return out

    def _prefill_together(self, lean: LeanForward, rows: list[int], ids: list[list[int]],
                          last_only: list[bool], hidden: bool | tuple) -> list[torch.Tensor]:
        segments, offset, select = [], 0, []
        for row, run, last in zip(rows, ids, last_only):
            segments.append((row, self.lengths[row], offset, len(run)))
            select.extend([offset + len(run) - 1] if last else range(offset, offset + len(run)))
            offset += len(run)
        self.cache.reserve(len(self.lengths), max(p + q for _, p, _, q in segments))
        positions = torch.cat([torch.arange(p, p + q) for _, p, _, q in segments])
        plan = ForwardPlan(query_pos=positions[None], attention=SEGMENTS, segments=segments)
        with torch.inference_mode():
            logits, states = lean(torch.tensor([sum(ids, [])], device=self.device),
                                  positions[None].to(self.device), None, self.cache.view(plan),
                                  plan, select=torch.tensor(select, device=self.device),
                                  hidden=hidden)
        self.checked(plan)
        out, first = [], 0
        for (row, past, _, q), last in zip(segments, last_only):
            n = 1 if last else q
            out.append(logits[0, first:first + n])
            first += n
            self.lengths[row] = past + q
        self.hidden = [states[0, o:o + q] for _, _, o, q in segments] if hidden else None
        return out

    def step(self, roots: list[int], drafts: list[Draft], hidden: bool | tuple = False
             ) -> list[torch.Tensor]:
        """One forward over every row: row r's pending token ``roots[r]`` and ``drafts[r]``.
        Returns logits [len(drafts[r]) + 1, V] per row. Rows' lengths grow by their draft + 1 until
        ``keep``. With ``hidden``, ``self.hidden`` is then each row's features [len + 1, H]."""
        b = len(self.lengths)
        if len(roots) != b or len(drafts) != b:
            raise ValueError(f"step needs one root and one draft per row ({b} rows)")
        sizes = [len(d) + 1 for d in drafts]
        q = max(sizes)
        if self.exact and b * q < MIN_ROWS and self.dtype != torch.float32:  # see models/exact.py
            q = -(-MIN_ROWS // b)
        lens = torch.tensor(self.lengths)
        kv_len = int(lens.max()) + q
        if self.exact:  # the exact attention reads up to the end of each query's key window
            kv_len = block_end(kv_len - 1)
        self.cache.reserve(b, kv_len)
        ids = torch.zeros(b, q, dtype=torch.long)
        positions = lens[:, None].repeat(1, q)
        reach = torch.empty(b, q, q, dtype=torch.bool)
        for r, draft in enumerate(drafts):
            ids[r, 0] = roots[r]
            if sizes[r] > 1:
                ids[r, 1:sizes[r]] = draft.tokens
                positions[r, 1:sizes[r]] += draft.depths()
            reach[r] = reach_matrix(draft.parents.tolist(), q)
        rel = torch.arange(kv_len)[None, :] - lens[:, None]  # [b, kv_len]: slot - row length
        new_slot = (rel >= 0) & (rel < q)
        own = torch.gather(reach, 2, rel.clamp(0, q - 1)[:, None, :].expand(b, q, kv_len))
        visible = (rel < 0)[:, None, :] | (own & new_slot[:, None, :])
        real = torch.arange(q)[None, :] < torch.tensor(sizes)[:, None]
        key_pos = None  # slot t holds position t, except a tree's nodes (their depth's position):
        if self.windows:  # what a sliding window needs to know
            key_pos = torch.arange(kv_len)[None].repeat(b, 1)
            key_pos[new_slot & (rel < torch.tensor(sizes)[:, None])] = positions[real]
        plan = ForwardPlan(query_pos=positions, key_pos=key_pos, rows=slice(0, b), kv_len=kv_len,
                           start=self.lengths[0] if b == 1 else None,  # one row: contiguous
                           index=None if b == 1 else
                           (lens[:, None] + torch.arange(q)[None, :]).to(self.device))
        if self.exact:
            plan.attention, plan.exact = EXACT, exact_plan(self.lengths, drafts, self.device)
        elif b > 1:
            plan.attention, plan.chunks = CHUNKS, plan_chunks((lens + q).tolist())
        # a large vocabulary makes the read-out a step's largest matmul: rows padded to the
        # longest draft are not read out (at least MIN_ROWS rows, see exact.py)
        select = real.view(-1).nonzero().squeeze(1) if b > 1 and sum(sizes) < b * q and sum(
            sizes) >= MIN_ROWS else None
        logits = self._forward(ids, plan, additive_mask(visible, self.dtype)[:, None],
                               hidden=hidden, select=None if select is None else
                               select.to(self.device))
        per_row = list(torch.split(logits[0], sizes)) if select is not None else \
            [logits[r, :sizes[r]] for r in range(b)]
        if hidden:
            self.hidden = [self.hidden[r, :sizes[r]] for r in range(b)]
        self.before = list(self.lengths)
        for r in range(b):
            self.lengths[r] += sizes[r]
        return per_row

    @torch.inference_mode()
    def keep(self, row: int, path: list[int]) -> None:
        """After ``step``, keep row ``row``'s pending token and the accepted ``path`` (node
        indices): their entries end up contiguous, in order."""
        start = self.before[row] + 1  # slot of draft node 0
        if path != list(range(len(path))):
            index = torch.tensor([start + i for i in path], device=self.device)
            self.cache.move(row, row, index, slice(start, start + len(path)))
        self.lengths[row] = start + len(path)

    def cached_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) [1, heads, length, dim] per layer of one row, for tests."""
        n = self.lengths[row]
        return [(k[row:row + 1, :, :n], v[row:row + 1, :, :n])
                for k, v in zip(self.cache.keys, self.cache.values)]


def warm_up(*models, exact: bool | None = None) -> float:
    """Compile each of ``models``' forwards now (None entries skipped; see ``compile_forward`` in
    ``models/layers.py``): a prefill, then steps over a few token counts, one token alone among
    them, so that no timed region pays for it. Returns the seconds taken."""
    start = time.perf_counter()
    for model in models:
        if model is None:
            continue
        own = default_exact(next(model.parameters()).dtype) if exact is None else exact
        for forward_exact in dict.fromkeys((own, False)):  # the plain forward's M = 1 steps
            target = BatchTarget(model, exact=forward_exact)
            row = target.add_row(64)
            target.prefill(row, [0] * 16)
            for n in (0, 3, 7):
                target.step([0], [Draft.chain(torch.zeros(n, dtype=torch.long))])
                target.keep(row, [])
    return time.perf_counter() - start
