"""The adapters' common part (``_Adapter``: what both know of their model, the checks every model
passes) and ``HFModel``: one request on a growing ``DynamicCache``, with ``crop``; draft models
use it. ``models/hf.py`` holds the engine's target (``BatchTarget``)."""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from specdecode.models.attention import additive_mask, causal_mask, tree_mask
from specdecode.models.lean import LeanForward
from specdecode.models.packed import packed_linears
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


# layer kinds whose attention sees only a window of recent keys (transformers' names:
# "sliding_attention", "chunked_attention", "hybrid_sliding", "reference_sliding_attention", the
# sliding-masked "compressed_sparse_attention" / "heavily_compressed_attention", GPT-Neo's "local")
WINDOWED_LAYERS = ("sliding", "chunk", "window", "local", "compressed")
# what configs call a window's size, first match wins (GPT-Neo: window_size; Llama 4: chunks)
WINDOW_SIZES = ("sliding_window", "window_size", "attention_chunk_size")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _positive(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _windows(config, model=None) -> list[tuple[str, int | None]]:
    """(where, size) of every window ``config`` (and its text config) or ``model``'s modules
    declare, binding or not; size None: a windowed layer kind whose size the config does not
    give."""
    found: list[tuple[str, int | None]] = []
    text = _text_config(config)
    for cfg in [config] + ([text] if text is not config else []):  # composite: text part nested
        kinds = {(name, str(k)) for name in ("layer_types", "attention_layers")
                 for k in (getattr(cfg, name, None) or [])}
        windowed = sorted((n, k) for n, k in kinds if any(w in k.lower() for w in WINDOWED_LAYERS))
        for name, kind in windowed:
            sizes = ("attention_chunk_size",) if "chunk" in kind.lower() else WINDOW_SIZES
            size = next((v for v in (_positive(getattr(cfg, n, None)) for n in sizes) if v), None)
            found.append((f"{name} {kind!r}", size))
        if windowed:
            continue
        for name in ("sliding_window", "attention_chunk_size"):
            size = _positive(getattr(cfg, name, None))
            if size is None or (name == "sliding_window"
                                and getattr(cfg, "use_sliding_window", None) is False):
                continue  # switched off (SmolLM3 keeps the size; Qwen2 / Qwen3 clear it)
            if name == "sliding_window" and kinds and _per_layer(model):
                continue  # the layers chose, by layer_types, and none of them is windowed
            found.append((f"config.{name}", size))
    for module_name, module in ([] if model is None else model.named_modules()):
        for name in ("sliding_window", "attention_chunk_size"):
            size = _positive(getattr(module, name, None))
            if size is not None:
                found.append((f"{module_name or 'the model'}.{name}", size))
    return found


def _per_layer(model) -> bool:
    """Whether ``model``'s attention modules carry their own window, none of them set: the
    modelling code picked each layer's window from ``layer_types`` (Qwen2 with
    ``use_sliding_window`` but every layer below ``max_window_layers``). Models that read
    ``config.sliding_window`` for every layer (Mistral, Mixtral, Phi-3) carry none."""
    if model is None:
        return False
    own = [m.sliding_window for m in model.modules() if hasattr(m, "sliding_window")]
    return bool(own) and not any(_positive(size) for size in own)


def attention_window(config, model=None) -> int | None:
    """The smallest sliding (or chunked) attention window that binds in ``config`` (or its
    ``get_text_config()``) and, given ``model``, in its modules; None where attention is full.

    Read from windowed ``layer_types`` (Gemma 2/3, Cohere 2, GPT-OSS, Ministral, Qwen2 layers
    from ``max_window_layers`` on, Llama 4's chunks), GPT-Neo's "local" ``attention_layers``,
    ``config.sliding_window`` unless ``use_sliding_window`` is False (Mistral, Mixtral, Phi-3,
    Starcoder2, Qwen3-MoE), ``config.attention_chunk_size`` and per-layer ``sliding_window``
    attributes of the modules. A window at least as long as the context
    (``max_position_embeddings``) never binds: the engine never lets a sequence grow past the
    context, so a query and its farthest key stay less than a window apart. Such a window is
    inactive (Mistral-style configs with the window equal to the context). 0: a windowed layer
    kind whose size the config does not give (still active). The context is the one the engine
    keeps to, ``context_length(config)``: a composite config without one of its own (only its
    text part has it) binds every window."""
    limit = context_length(config)
    sizes = [size or 0 for _, size in _windows(config, model) if size is None or limit is None
             or size < limit]
    return min(sizes) if sizes else None


def check_window(config, model=None, what: str = "the model") -> None:
    """``SpecDecodeError`` where ``attention_window`` finds a window that binds."""
    window = attention_window(config, model)
    if window is None:
        return
    text = _text_config(config)
    kind = getattr(text, "model_type", None) or getattr(config, "model_type", None) or \
        getattr(config, "kind", None) or type(model or config).__name__
    limit = context_length(config)
    where = sorted({w for w, size in _windows(config, model) if (size or 0) == window})
    where = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
    size = f"a window of {window} tokens" if window else "a window of unknown size"
    label = what if str(kind) in what else f"{what} ({kind})"
    raise SpecDecodeError(
        f"{label} uses sliding-window attention ({size}, from {where}"
        f"{f'; context {limit}' if limit else ''}): sliding-window attention is not supported "
        "yet (specdecode's masks and caches would ignore the window and decode wrong tokens). "
        "A window at least as long as the context is accepted.")


def check_model(model, what: str = "the model") -> None:
    """Refuse the models whose cache cannot follow a tree path (``what`` names the model in the
    error); make sure masks are honoured."""
    config = model.config
    check_window(config, model, what)
    if getattr(config, "is_encoder_decoder", False):
        raise SpecDecodeError("encoder-decoder models are not supported; give a causal LM")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in (None, "sdpa", "eager"):
        model.set_attn_implementation("sdpa")  # tree masks need an implementation that takes them


class _Adapter:
    """What both adapters know of their model."""

    role = "the target model"  # how errors name the model (``HFModel``: a draft)

    def __init__(self, model) -> None:
        check_model(model, self.role)
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

    role = "the draft model"

    def __init__(self, model, vocab: torch.Tensor | None = None) -> None:
        super().__init__(model)
        self.cache = None
        self.length = 0  # tokens held in the cache
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
        with self.packed or nullcontext():  # the CPU's packed matmuls (models/packed.py)
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
