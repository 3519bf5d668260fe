"""The model adapters over transformers: with ``models/slot_cache.py``, the only code that touches
the HF cache API.

Two adapters, one invariant: a request's cache holds its committed tokens except the last one (the
*pending* token), so one step is exactly one forward over ``[pending] + draft`` with a tree mask,
after which ``keep(path)`` leaves the pending token and the accepted path in the cache, in order.

- ``BatchTarget`` (the engine's target): a preallocated cache of many rows, one per running
  request, each at its own offset. A step runs every row together; nothing is concatenated or
  copied per step (see ``SlotCache``).
- ``HFModel``: one request on a growing ``DynamicCache``, with ``crop``; draft models use it.

Both run Llama-family models through ``models/lean.py`` (the same values, less overhead).
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any, Protocol

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from specdecode.models.attention import plan_chunks, reach_matrix, rows_attention, tree_mask
from specdecode.models.exact import (
    MIN_ROWS,
    ExactMatmul,
    default_exact,
    exact_plan,
    window_end,
)
from specdecode.models.lean import LeanForward
from specdecode.models.packed import packed_linears
from specdecode.models.slot_cache import SlotCache
from specdecode.models.sources import load_causal_lm  # noqa: F401 - re-exported
from specdecode.types import Draft, SpecDecodeError


class TargetModel(Protocol):
    """What the engine needs from a target: rows (one per running request) with their own caches,
    a prefill per row, one forward for every row's draft, and ``keep`` per row. Asked with
    ``hidden=True``, ``prefill`` and ``step`` leave the target's features (last hidden states, the
    LM head's input) of what they ran in ``hidden``, for feature-level drafters."""

    vocab_size: int
    max_length: int | None
    lengths: list[int]
    hidden: Any

    def reserve(self, rows: int, length: int) -> None: ...

    def add_row(self, need: int) -> int: ...

    def remove_row(self, row: int) -> int | None: ...

    def prefill(self, row: int, ids: list[int], last_only: bool = False,
                hidden: bool = False) -> torch.Tensor: ...

    def prefill_rows(self, rows: list[int], ids: list[list[int]], last_only: list[bool],
                     hidden: bool = False) -> list[torch.Tensor]: ...

    def step(self, roots: list[int], drafts: list[Draft], hidden: bool = False
             ) -> list[torch.Tensor]: ...

    def keep(self, row: int, path: list[int]) -> None: ...


def cache_arg(model) -> str:
    """How ``model.forward`` names its KV cache (5.25 renamed ``past_key_values``; it warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def fresh_cache(model) -> dict:
    """A new ``DynamicCache`` for ``model``, as keywords (decoding loops outside the engine)."""
    from transformers import DynamicCache

    return {cache_arg(model): DynamicCache()}


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model(model) -> None:
    """Refuse the models whose cache cannot follow a tree path; make sure masks are honoured."""
    config = model.config
    if any("sliding" in str(t) for t in (getattr(config, "layer_types", None) or [])):
        raise SpecDecodeError("models with sliding-window attention layers are not supported "
                              "yet (their cache cannot be trimmed to a tree path)")
    if getattr(config, "is_encoder_decoder", False):
        raise SpecDecodeError("encoder-decoder models are not supported; give a causal LM")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager"):
        model.set_attn_implementation("sdpa")  # tree masks need an implementation that takes them


class _Adapter:
    """What both adapters know of their model."""

    def __init__(self, model) -> None:
        check_model(model)
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = context_length(model.config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        params = inspect.signature(model.forward).parameters
        self.can_slice_logits = "logits_to_keep" in params
        self.cache_arg = cache_arg(model)


class BatchTarget(_Adapter):
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
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                 last_only: bool = False, chunks: list[tuple[int, int, int]] | None = None,
                 causal: bool = False, hidden: bool = False, exact: list | None = None
                 ) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if last_only and self.can_slice_logits else {}
        mode = ExactMatmul() if exact is not None and self.dtype == torch.float32 else \
            self.packed or nullcontext()  # half precision on the CPU: models/packed.py
        lean = LeanForward.build(self.model)  # models/lean.py, where the model allows
        with rows_attention(self.model.config, chunks, causal, exact), mode:
            if lean is not None:
                logits, self.hidden = lean(ids.to(self.device), positions.to(self.device),
                                           mask.to(self.device), self.cache, last_only, hidden)
                return logits
            out = self.model(input_ids=ids.to(self.device),
                             position_ids=positions.to(self.device),
                             attention_mask=mask.to(self.device), use_cache=True,
                             output_hidden_states=hidden, **{self.cache_arg: self.cache}, **extra)
        # the last layer's output after the final norm: what the LM head reads
        self.hidden = out.hidden_states[-1] if hidden else None
        return out.logits.float()

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(visible.shape, dtype=self.dtype)
        return mask.masked_fill_(~visible, torch.finfo(self.dtype).min)

    def prefill(self, row: int, ids: list[int], last_only: bool = False,
                hidden: bool = False) -> torch.Tensor:
        """Causal forward of ``ids`` after row ``row``'s cached tokens; logits [len(ids), V] (with
        ``last_only``, at least the last row). With ``hidden``, ``self.hidden`` is then the
        target's features (last hidden states) of every id, [len(ids), H]."""
        past, q = self.lengths[row], len(ids)
        self.cache.reserve(len(self.lengths), past + q)
        cache = self.cache
        cache.rows, cache.start, cache.index, cache.kv_len = slice(row, row + 1), past, None, past + q
        visible = torch.arange(past + q)[None, :] <= (past + torch.arange(q))[:, None]
        logits = self._forward(torch.tensor([ids]), torch.arange(past, past + q)[None],
                               self._additive(visible)[None, None], last_only,
                               causal=past == 0 and q > 1, hidden=hidden)
        if hidden:
            self.hidden = self.hidden[0]
        self.lengths[row] = past + q
        return logits[0]

    def prefill_rows(self, rows: list[int], ids: list[list[int]], last_only: list[bool],
                     hidden: bool = False) -> list[torch.Tensor]:
        """``prefill`` of several rows (requests joining together), in one forward where that
        gives each row exactly its own prefill's values: the lean forward on oneDNN's packed
        half-precision matmuls, whose result for a token does not depend on how many tokens
        share the call (measured: tests/test_lean.py). Each row's attention runs alone, as in
        its own prefill. Else one prefill per row. With ``hidden``, ``self.hidden`` is then a list
        of each row's features."""
        lean = LeanForward.build(self.model)
        if len(rows) < 2 or lean is None or not lean.pack:
            out, features = [], []
            for row, run, last in zip(rows, ids, last_only):
                out.append(self.prefill(row, run, last, hidden))
                features.append(self.hidden)
            self.hidden = features if hidden else None
            return out
        segments, offset, select = [], 0, []
        for row, run, last in zip(rows, ids, last_only):
            segments.append((row, self.lengths[row], offset, len(run)))
            select.extend([offset + len(run) - 1] if last else range(offset, offset + len(run)))
            offset += len(run)
        self.cache.reserve(len(self.lengths), max(p + q for _, p, _, q in segments))
        positions = torch.cat([torch.arange(p, p + q) for _, p, _, q in segments])
        config = self.model.config
        inner = ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, lean.eager)
        self.cache.segments = segments
        try:
            sdpa = config._attn_implementation == "sdpa"  # empty rows then plainly causal
            with torch.inference_mode(), rows_attention(config, None, sdpa,
                                                        segments=segments, inner=inner):
                logits, states = lean(torch.tensor([sum(ids, [])], device=self.device),
                                      positions[None].to(self.device), None, self.cache,
                                      select=torch.tensor(select, device=self.device),
                                      hidden=hidden)
        finally:
            self.cache.segments = None
        out, first = [], 0
        for (row, past, _, q), last in zip(segments, last_only):
            n = 1 if last else q
            out.append(logits[0, first:first + n])
            first += n
            self.lengths[row] = past + q
        self.hidden = [states[0, o:o + q] for _, _, o, q in segments] if hidden else None
        return out

    def step(self, roots: list[int], drafts: list[Draft], hidden: bool = False
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
            kv_len = window_end(kv_len - 1)
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
        window = (rel >= 0) & (rel < q)
        own = torch.gather(reach, 2, rel.clamp(0, q - 1)[:, None, :].expand(b, q, kv_len))
        visible = (rel < 0)[:, None, :] | (own & window[:, None, :])
        cache = self.cache
        cache.rows, cache.start, cache.kv_len = slice(0, b), None, kv_len
        if b == 1:  # one row: its new entries are contiguous
            cache.start, cache.index = self.lengths[0], None
        else:
            cache.index = (lens[:, None] + torch.arange(q)[None, :]).to(self.device)
        try:
            chunks = plan_chunks((lens + q).tolist()) if b > 1 and not self.exact else None
            logits = self._forward(ids, positions, self._additive(visible)[:, None],
                                   chunks=chunks, hidden=hidden,
                                   exact=exact_plan(self.lengths, drafts, self.device)
                                   if self.exact else None)
        finally:
            cache.index = None
        if hidden:
            self.hidden = [self.hidden[r, :sizes[r]] for r in range(b)]
        self.before = list(self.lengths)
        for r in range(b):
            self.lengths[r] += sizes[r]
        return [logits[r, :sizes[r]] for r in range(b)]

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


class HFModel(_Adapter):
    """A transformers causal LM with one request's growing cache (draft models use it)."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.cache = None
        self.length = 0  # tokens held in the cache

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.length = 0

    @torch.inference_mode()
    def _forward(self, ids: list[int], positions: torch.Tensor, mask,
                 last_only: bool = False) -> torch.Tensor:
        if self.cache is None:
            self.reset()
        lean = LeanForward.build(self.model)  # models/lean.py, where the model allows
        if lean is not None:
            q = len(ids)
            sdpa = self.model.config._attn_implementation == "sdpa"  # causal without a mask
            if mask is None and q > 1 and (self.length or not sdpa):
                # the model's forward would make this causal mask itself: the new tokens see the
                # whole cache and each other up to themselves
                visible = torch.arange(self.length + q)[None, :] <= \
                    (self.length + torch.arange(q))[:, None]
                mask = torch.zeros(visible.shape, dtype=self.dtype).masked_fill_(
                    ~visible, torch.finfo(self.dtype).min)[None, None].to(self.device)
            logits, _ = lean(torch.tensor([ids], device=self.device),
                             positions[None].to(self.device), mask, self.cache, last_only)
            self.length += q
            return logits[0]
        extra = {"logits_to_keep": 1} if last_only and self.can_slice_logits else {}
        out = self.model(input_ids=torch.tensor([ids], device=self.device),
                         position_ids=positions[None].to(self.device), attention_mask=mask,
                         use_cache=True, **{self.cache_arg: self.cache}, **extra)
        self.length += len(ids)
        return out.logits[0].float()

    def extend(self, ids: list[int], last_only: bool = False) -> torch.Tensor:
        """Causal forward of ``ids`` on top of the cache; logits [len(ids), V] (with
        ``last_only``, at least the last row: prefill skips the LM head where the model allows)."""
        positions = torch.arange(self.length, self.length + len(ids))
        return self._forward(ids, positions, None, last_only)

    def forward_tree(self, root: int, draft: Draft) -> torch.Tensor:
        """One forward over ``[root] + draft.tokens``; logits [n + 1, V]. A chain uses the plain
        causal mask; a tree gets a 4D mask and per-node positions."""
        ids = [root] + draft.tokens.tolist()
        parents = draft.parents
        if draft.is_chain():
            return self.extend(ids)
        depths = torch.cat([torch.zeros(1, dtype=torch.long), draft.depths()])
        mask = tree_mask(parents, self.length, self.dtype).to(self.device)
        return self._forward(ids, self.length + depths, mask)

    def forward_nodes(self, ids: list[int], positions: list[int],
                      visible: torch.Tensor) -> torch.Tensor:
        """Forward new tree nodes on top of the cache (committed tokens, then earlier tree nodes):
        ``visible`` [len(ids), cache length + len(ids)] (bool) says which cached entries and which
        of the new nodes each new node attends to; ``positions`` are their absolute positions.
        Logits [len(ids), V]. The caller crops the tree nodes away when done."""
        mask = torch.zeros(visible.shape, dtype=self.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return self._forward(ids, torch.tensor(positions), mask[None, None].to(self.device))

    @torch.inference_mode()
    def keep(self, path: list[int], num_nodes: int) -> None:
        """After ``forward_tree`` over ``num_nodes`` draft nodes, keep the root and ``path``."""
        base = self.length - num_nodes  # cache index just after the root
        keep_len = base + len(path)
        if path != list(range(len(path))):
            index = torch.tensor([base + i for i in path], device=self.device)
            for layer in self.cache.layers:
                layer.keys[..., base:keep_len, :] = layer.keys.index_select(-2, index)
                layer.values[..., base:keep_len, :] = layer.values.index_select(-2, index)
        self.crop(keep_len)

    def crop(self, length: int) -> None:
        """Drop every cached token from index ``length`` on."""
        if length < self.length:
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
        self.length = min(length, self.length)

    def cached_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer, for tests comparing against a fresh prefill."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]
