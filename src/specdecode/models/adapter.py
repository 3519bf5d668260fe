"""The adapters' common part (``_Adapter``: what both know of their model, the checks every model
passes) and ``HFModel``: one request on a growing ``DynamicCache``, with ``crop``; draft models
use it. ``models/hf.py`` holds the engine's target (``BatchTarget``)."""

from __future__ import annotations

import inspect

import torch

from specdecode.models.attention import additive_mask, causal_mask, tree_mask
from specdecode.models.lean import LeanForward
from specdecode.types import Draft, SpecDecodeError


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


class HFModel(_Adapter):
    """A transformers causal LM with one request's growing cache (draft models use it).

    ``vocab`` (sorted token ids): read out only these tokens (a draft's reduced vocabulary:
    VocabTrim, Goel et al. 2025; FR-Spec, Zhao et al. 2025); the others get logit -inf, so they
    are never drafted. Logits keep the whole vocabulary's width."""

    def __init__(self, model, vocab: torch.Tensor | None = None) -> None:
        super().__init__(model)
        self.cache = None
        self.length = 0  # tokens held in the cache
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
                # the causal mask the model's forward would make itself
                mask = causal_mask(self.length, q, self.dtype).to(self.device)
            logits, _ = lean(torch.tensor([ids], device=self.device),
                             positions[None].to(self.device), mask, self.cache, last_only,
                             head=self._head(lean))
            self.length += q
            return self._widen(logits[0])
        extra = {"logits_to_keep": 1} if last_only and self.can_slice_logits else {}
        out = self.model(input_ids=torch.tensor([ids], device=self.device),
                         position_ids=positions[None].to(self.device), attention_mask=mask,
                         use_cache=True, **{self.cache_arg: self.cache}, **extra)
        self.length += len(ids)
        logits = out.logits[0].float()
        return logits if self.vocab is None else self._widen(logits.index_select(1, self.vocab))

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
