"""``HFModel``: one request on a growing ``DynamicCache``, with ``crop``; draft models use it.
Its forwards are planned like the target's (``models/plan.py``): positions of the queries and of
every cached key (a tree's nodes sit at their depth's position, whatever their slot), so sliding
windows hold for drafts too."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from specdecode.models.adopt import Adapter
from specdecode.models.attention import SDPA
from specdecode.models.lean import LeanForward
from specdecode.models.masks import additive_mask, causal_mask, tree_mask
from specdecode.models.packed import packed_linears
from specdecode.models.plan import ForwardPlan
from specdecode.types import Draft


class HFModel(Adapter):
    """A transformers causal LM with one request's growing cache (draft models use it).

    ``vocab`` (sorted token ids): read out only these tokens (a draft's reduced vocabulary:
    VocabTrim, Goel et al. 2025; FR-Spec, Zhao et al. 2025); the others get logit -inf, so they
    are never drafted. Logits keep the whole vocabulary's width."""

    role = "the draft model"

    def __init__(self, model, vocab: torch.Tensor | None = None) -> None:
        super().__init__(model)
        self.cache = None
        self.length = 0  # tokens held in the cache
        self.key_pos = torch.zeros(0, dtype=torch.long)  # the position of each cached entry
        # the lean forward (models/lean.py) packs its own weights; otherwise the model's linears
        self.packed = None if LeanForward.build(model) else packed_linears(model)
        self.vocab = None if vocab is None else vocab.to(self.device)
        self._read_out: tuple[object, torch.Tensor] | None = None  # (lean forward, its weight)

    def _head(self, lean) -> torch.Tensor | None:
        """The reduced read-out as ``lean``'s matmuls take it (made once per lean forward)."""
        if self.vocab is None:
            return None
        if self._read_out is None or self._read_out[0] is not lean:
            weight = self.model.get_output_embeddings().weight.detach()
            self._read_out = (lean, lean.linear(weight.index_select(0, self.vocab)))
        return self._read_out[1]

    def _widen(self, logits: torch.Tensor) -> torch.Tensor:
        """[n, len(vocab)] logits to [n, V], -inf outside the reduced vocabulary."""
        if self.vocab is None:
            return logits
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return full.index_copy_(1, self.vocab, logits)

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.length = 0
        self.key_pos = torch.zeros(0, dtype=torch.long)

    @torch.inference_mode()
    def _forward(self, ids: list[int], positions: torch.Tensor, mask,
                 last_only: bool = False) -> torch.Tensor:
        if self.cache is None:
            self.reset()
        key_pos = torch.cat([self.key_pos, positions])
        plan = ForwardPlan(query_pos=positions[None], key_pos=key_pos[None])
        lean = LeanForward.build(self.model)  # models/lean.py, where the model allows
        if lean is not None:
            q = len(ids)
            sdpa = self.model.config._attn_implementation == SDPA  # causal without a mask
            if mask is None and q > 1 and (self.length or not sdpa):
                # the causal mask the model's forward would make itself
                mask = causal_mask(self.length, q, self.dtype).to(self.device)
            logits, _ = lean(torch.tensor([ids], device=self.device),
                             positions[None].to(self.device), mask, self.cache, plan, last_only,
                             head=self._head(lean))
            logits = self._widen(logits[0])
        else:
            extra = {"logits_to_keep": 1} if last_only and self.can_slice_logits else {}
            with self.packed or nullcontext():  # the CPU's packed matmuls (models/packed.py)
                out = self.model(input_ids=torch.tensor([ids], device=self.device),
                                 position_ids=positions[None].to(self.device),
                                 attention_mask=mask, use_cache=True, specdecode=plan,
                                 **{self.cache_arg: self.cache}, **extra)
            logits = out.logits[0].float()
            if self.vocab is not None:
                logits = self._widen(logits.index_select(1, self.vocab))
        self.checked(plan)
        self.length += len(ids)
        self.key_pos = key_pos
        return logits

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
        mask = additive_mask(visible, self.dtype)[None, None].to(self.device)
        return self._forward(ids, torch.tensor(positions), mask)

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
            self.key_pos[base:keep_len] = self.key_pos[index.cpu()]
        self.crop(keep_len)

    def crop(self, length: int) -> None:
        """Drop every cached token from index ``length`` on."""
        if length < self.length:
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., :length, :]
                layer.values = layer.values[..., :length, :]
        self.length = min(length, self.length)
        self.key_pos = self.key_pos[:self.length]

    def cached_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) per layer, for tests comparing against a fresh prefill."""
        return [(layer.keys, layer.values) for layer in self.cache.layers]
