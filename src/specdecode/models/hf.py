"""The model adapter over transformers: the only file that touches the HF cache API.

``HFModel`` wraps a causal LM plus one request's KV cache. The cache always holds the committed
tokens except the last one (the *pending* token), so one step is exactly one forward:
``[pending] + draft`` with a tree mask, after which ``keep(path)`` leaves the pending token and the
accepted path in the cache, in order.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Protocol

import torch

from specdecode.types import Draft, SpecDecodeError


class TargetModel(Protocol):
    """What the engine needs from a target (one request; a batch dimension can be added later)."""

    vocab_size: int
    max_length: int | None

    def reset(self) -> None: ...

    def extend(self, ids: list[int], last_only: bool = False) -> torch.Tensor: ...

    def forward_tree(self, root: int, draft: Draft) -> torch.Tensor: ...

    @torch.inference_mode()
    def keep(self, path: list[int], num_nodes: int) -> None: ...


def load_causal_lm(source, *, what: str = "model", trust_remote_code: bool = False,
                   dtype: torch.dtype = torch.float32):
    """A transformers causal LM from an already-loaded model or a local directory (safetensors)."""
    if not isinstance(source, (str, Path)):
        if not hasattr(source, "config") or not callable(source):
            raise SpecDecodeError(f"{what} must be a transformers causal LM or a local path, "
                                  f"got {type(source).__name__}")
        return source.eval()
    path = Path(source).expanduser()
    if not path.is_dir() or not (path / "config.json").exists():
        raise SpecDecodeError(f"{what} path {str(path)!r} is not a directory with a config.json "
                              "(only local models can be loaded; there is no model hub here)")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise SpecDecodeError(f"cannot load {what} from {str(path)!r}: {err}") from err
    return model.eval()


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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


class HFModel:
    """A transformers causal LM with one request's KV cache (used for targets and draft models)."""

    def __init__(self, model) -> None:
        config = model.config
        if any("sliding" in str(t) for t in (getattr(config, "layer_types", None) or [])):
            raise SpecDecodeError("models with sliding-window attention layers are not supported "
                                  "yet (their cache cannot be trimmed to a tree path)")
        if getattr(config, "is_encoder_decoder", False):
            raise SpecDecodeError("encoder-decoder models are not supported; give a causal LM")
        impl = getattr(config, "_attn_implementation", None)
        if impl not in (None, "sdpa", "eager"):
            model.set_attn_implementation("sdpa")  # tree masks need an implementation that takes them
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = context_length(config)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.cache = None
        self.length = 0  # tokens held in the cache
        self.can_slice_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.length = 0

    @torch.inference_mode()
    def _forward(self, ids: list[int], positions: torch.Tensor, mask,
                 last_only: bool = False) -> torch.Tensor:
        if self.cache is None:
            self.reset()
        extra = {"logits_to_keep": 1} if last_only and self.can_slice_logits else {}
        out = self.model(input_ids=torch.tensor([ids], device=self.device),
                         position_ids=positions[None].to(self.device), attention_mask=mask,
                         past_key_values=self.cache, use_cache=True, **extra)
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
